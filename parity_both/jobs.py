"""Glue for scripts/: logging into the rule's log file, and the structured failure record.

When a job fails, Snakemake keeps its log but deletes its outputs (no half-written results). The
failure record written beside the log says what kind of failure it was, so the `parity-both`
command can map it to the documented exit code without scraping messages.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def failure_record_path(log_path: str | Path) -> Path:
    """Where a failure record goes: beside the log, as ``<log>.failure.json``."""
    return Path(f"{log_path}.failure.json")


def failure_record(
    exc: BaseException,
    *,
    rule: str | None = None,
    wildcards: Mapping[str, Any] | None = None,
    log: str | Path | None = None,
) -> dict[str, Any]:
    """The one failure record (one schema for every writer: a workflow job, or the provisioning
    command ``python -m parity_both.provision.backends provision``). Every key is always present:

    - ``exit_code``: the documented exit status (2 bad input, 3 network, 4 permission, 5 build,
      6 recursion, 1 internal); ``kind``: its class (e.g. ``bad_model``, ``network``,
      ``backend_missing``, ``bad_source``, ``internal``); ``message``: the error's first line;
    - ``rule``, ``wildcards``: the failed job (None and {} outside a workflow); ``log``: its log;
    - for provisioning failures (else None / "" / {}): ``backend`` (the backend's name), ``phase``
      (spec, prepare, fetch, checkout, install, configure, compile, verify, probe, guard),
      ``hint`` (how to fix it, e.g. the repair command), ``build_log`` (the full build output),
      ``details`` (errno, returncode, command, attempts, ...).
    """
    code, kind = classify(exc)
    record: dict[str, Any] = {
        "exit_code": code,
        "kind": kind,
        "message": first_line(exc),
        "rule": rule,
        "wildcards": dict(wildcards or {}),
        "log": str(log) if log else None,
        "backend": None,
        "phase": None,
        "hint": "",
        "build_log": None,
        "details": {},
    }
    record.update(getattr(exc, "record", {}) or {})
    return record


def write_failure_record(log_path: str | Path, record: Mapping[str, Any]) -> Path:
    """Write the record beside log_path (atomically); returns its path."""
    path = failure_record_path(log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(dict(record), sort_keys=True, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def run_job(snakemake: Any, body: Callable[[], None]) -> None:
    """Run a script body with stderr and logging sent to the rule's log; on failure write the
    failure record and exit with its code."""
    log_path = snakemake.log[0] if snakemake.log else None
    fh = open(log_path, "w", buffering=1) if log_path else sys.stderr
    logging.basicConfig(stream=fh, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    if log_path:
        failure_record_path(log_path).unlink(missing_ok=True)
        sys.stderr = fh
    try:
        body()
    except BaseException as exc:  # noqa: BLE001 - every failure gets a record, then propagates
        record = failure_record(
            exc,
            rule=getattr(snakemake, "rule", None),
            wildcards=getattr(snakemake, "wildcards", {}) or {},
            log=log_path,
        )
        print(f"ERROR: {record['message']}", file=fh)
        traceback.print_exc(file=fh)
        if log_path:
            write_failure_record(log_path, record)
        fh.flush()
        os._exit(record["exit_code"])
    fh.flush()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def classify(exc: BaseException) -> tuple[int, str]:
    """(exit code, kind) of an exception: a provisioning failure carries its own (2-6)."""
    code = getattr(exc, "code", None)
    if isinstance(code, int) and code in (2, 3, 4, 5, 6):
        return code, getattr(exc, "kind", "backend")
    from parity_both.gguf.reader import GGUFError

    if isinstance(exc, GGUFError):
        return 2, "bad_model"
    name = type(exc).__name__
    if name in ("InputError", "ConfigError", "TemplateError", "TokenizerError"):
        return 2, "bad_input"
    return 1, "internal"


def process_alive(pid: int) -> bool:
    """True if pid runs (a zombie, killed but not yet reaped, does not; another user's process does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" not in status
