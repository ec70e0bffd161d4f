"""Provisioning failures: the exit codes, the ``BackendFailure`` exception, and how low-level errors
(errno, build-step errors) are classified into it.

    2 missing and repair disabled, or an unusable spec/source (unknown lane, pinned commit absent)
    3 source unreachable (after retries with backoff)   4 cache/build dir not writable
    5 configure/compile (or install-build) failure      6 a nested repair: a repair (a build step, a
      configure script) started parity-both, Snakemake or a backend repair that needed a repair itself

A repair runs with PARITY_BOTH_REPAIRING set (inherited by everything it starts, through build steps,
Snakemake and parity-both alike); a repair requested while it is set is refused with exit 6 and signs a
file the outer repair named (PARITY_BOTH_REPAIR_REFUSALS), so the outer repair, whose step then failed,
fails with 6 too (not 5) whatever the step printed.

The failure record written beside a job's log is defined once, in parity_both.jobs.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

from parity_both.hashing import ENV_CACHE
from parity_both.provision.build import HarnessBuildError

EXIT_MISSING = 2
EXIT_NETWORK = 3
EXIT_PERMISSION = 4
EXIT_BUILD = 5
EXIT_RECURSION = 6
EXIT_SOURCE = 2  # "bad arguments or unusable input" in the pipeline's exit-code table
RECURSION_REFUSED = "refusing to recurse"  # in the message of every refused nested repair
_KINDS = {
    EXIT_MISSING: "backend_missing",
    EXIT_NETWORK: "network",
    EXIT_PERMISSION: "permission",
    EXIT_BUILD: "build",
    EXIT_RECURSION: "recursion",
}

NOT_WRITABLE_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.ENOSPC,
    errno.EDQUOT,
}


class BackendFailure(Exception):
    """A classified provisioning failure. ``code`` is the process exit status to use; ``backend``
    names the backend once provision_backend knows it."""

    def __init__(
        self,
        code: int,
        phase: str,
        message: str,
        *,
        log_path: Path | str | None = None,
        hint: str = "",
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.phase = phase
        self.message = message
        self.log_path = str(log_path) if log_path else None
        self.hint = hint
        self.details = dict(details or {})
        self.backend: str | None = None

    @property
    def kind(self) -> str:
        return "bad_source" if self.phase in ("spec", "checkout", "checksum") else _KINDS.get(self.code, "backend")

    @property
    def record(self) -> dict[str, Any]:
        """The backend fields of the failure record (parity_both.jobs.failure_record)."""
        return {
            "phase": self.phase,
            "hint": self.hint,
            "build_log": self.log_path,
            "details": self.details,
            "backend": self.backend,
        }

    def __str__(self) -> str:
        out = f"[{self.code}] {self.phase}: {self.message}"
        if self.hint:
            out += f"\nhint: {self.hint}"
        if self.log_path:
            out += f"\nlog: {self.log_path}"
        return out


def nested_repair_failure(what: str, nested: str, log_path: Path | str | None) -> BackendFailure:
    """A repair step failed because a repair it started (``nested``: which backend) was refused."""
    return BackendFailure(
        EXIT_RECURSION,
        "guard",
        f"a nested repair: the repair of backend {nested} was started from inside this repair "
        f"({what}), {RECURSION_REFUSED}",
        log_path=log_path,
        hint="a backend's build must not run parity-both, this workflow or a backend repair: build the "
        "program directly, or provision the other backend first",
        details={"nested": nested, "step": what},
    )


def classify_build_error(exc: HarnessBuildError, log_path: Path) -> BackendFailure:
    """A failed build step: an unwritable directory is 4, anything else (configure, compile, a missing
    tool) 5 (or 6, decided by the repair guard, when the step started a refused nested repair)."""
    if exc.errno in NOT_WRITABLE_ERRNOS:
        return BackendFailure(
            EXIT_PERMISSION,
            exc.phase,
            exc.message,
            log_path=exc.log_path or log_path,
            hint=f"make the cache writable or set {ENV_CACHE}",
            details={"errno": exc.errno},
        )
    hint = "see the log for the first compiler error"
    if exc.errno == errno.ENOENT and exc.cmd:
        hint = f"install {exc.cmd[0]}"
    return BackendFailure(
        EXIT_BUILD,
        exc.phase,
        exc.message,
        log_path=exc.log_path or log_path,
        hint=hint,
        details={"returncode": exc.returncode, "errno": exc.errno, "command": [str(c) for c in exc.cmd]},
    )


def classify_os_error(exc: OSError, log_path: Path) -> BackendFailure | None:
    """An OSError during a repair: 4 when a directory is not writable, else None (not ours)."""
    if exc.errno not in NOT_WRITABLE_ERRNOS:
        return None
    return BackendFailure(
        EXIT_PERMISSION,
        "prepare",
        f"{exc.strerror or exc}: {exc.filename}",
        log_path=log_path,
        details={"errno": exc.errno},
    )
