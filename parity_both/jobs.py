"""Glue for scripts/: logging into the rule's log file, and structured failure records.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any


def failure_record_path(log_path: str | Path) -> Path:
    return Path(f"{log_path}.failure.json")


def run_job(snakemake: Any, body: Callable[[], None]) -> None:
    """Run a script body with stderr and logging sent to the rule's log."""
    # Fixed BLAS threads: the reference's numbers must not depend on the machine's core count.
    log_path = snakemake.log[0] if snakemake.log else None
    fh = open(log_path, "w", buffering=1) if log_path else sys.stderr
    logging.basicConfig(stream=fh, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        force=True)
    if log_path:
        failure_record_path(log_path).unlink(missing_ok=True)
        sys.stderr = fh
    try:
        body()
    except BaseException as exc:  # noqa: BLE001 - every failure gets a record, then propagates
        code, kind = classify(exc)
        record = {"exit_code": code, "kind": kind, "rule": getattr(snakemake, "rule", None),
                  "message": first_line(exc), "wildcards": dict(getattr(snakemake, "wildcards", {}) or {}),
                  "log": log_path}
        record.update(getattr(exc, "record", {}) or {})
        print(f"ERROR: {record['message']}", file=fh)
        traceback.print_exc(file=fh)
        if log_path:
            failure_record_path(log_path).write_text(json.dumps(record, sort_keys=True, indent=2))
        fh.flush()
        os._exit(code if code else 1)
    fh.flush()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def classify(exc: BaseException) -> tuple[int, str]:
    code = getattr(exc, "code", None)
    if isinstance(code, int) and code in (2, 3, 4, 5, 6):
        return code, getattr(exc, "kind", "backend")
    if isinstance(code, int) and code == 7:  # a backend source/spec that cannot be used: bad input
        return 2, getattr(exc, "kind", "bad_source")
    from parity_both.gguf.reader import GGUFError

    if isinstance(exc, GGUFError):
        return 2, "bad_model"
    name = type(exc).__name__
    if name in ("InputError", "ConfigError", "TemplateError", "TokenizerError"):
        return 2, "bad_input"
    return 1, "internal"
