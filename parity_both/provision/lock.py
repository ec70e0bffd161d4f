"""A cross-process lock for builds in the shared cache (PARITY_BOTH_CACHE).

Cluster jobs on several nodes, or several local jobs, may all find a backend missing at once. Each takes an
exclusive fcntl lock on ``<cache>/locks/<name>.lock`` before building, and re-checks whether the build exists
once it holds the lock: the first job builds, the others wait and then reuse its result. fcntl locks work on
local file systems and on NFS v4 (lockd on v3); they are released by the kernel if the holder dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def lock_path(cache_dir: Path | str, name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    return Path(cache_dir) / "locks" / f"{safe}.lock"


@contextlib.contextmanager
def build_lock(cache_dir: Path | str, name: str, *, poll: float = 0.5) -> Iterator[float]:
    """Hold the exclusive lock named `name` under cache_dir; yields the seconds spent waiting for it (0.0 when
    it was free at once)."""
    path = lock_path(cache_dir, name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
    except OSError:  # an unwritable cache: nothing can be built there, the build reports why
        yield 0.0
        return
    t0 = time.monotonic()
    try:
        told = False
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:  # EACCES or EAGAIN: held by another process
                if not told:
                    print(f"[lock] waiting for {path} (another job is building {name})", file=sys.stderr)
                    told = True
                time.sleep(poll)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {os.uname().nodename}\n".encode())
        yield time.monotonic() - t0 if told else 0.0  # 0.0: nobody else held it
    finally:
        with contextlib.suppress(OSError):
            fcntl.lockf(fd, fcntl.LOCK_UN)
        os.close(fd)
