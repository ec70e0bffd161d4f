"""numpy's BLAS threads: fixed and reported so reference runs are reproducible and do not oversubscribe."""

from __future__ import annotations

import ctypes
import functools
import glob
import os
from typing import Any

import numpy as np

_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


_OPENBLAS_NAMES = (("scipy_openblas_", "64_"), ("scipy_openblas_", ""), ("openblas_", ""), ("openblas_", "64_"))


@functools.cache
def _openblas() -> tuple[Any, str] | None:
    """numpy's OpenBLAS via ctypes (pip wheels bundle scipy-openblas in numpy.libs; conda links a
    shared libopenblas, found in /proc/self/maps) and its symbol prefix/suffix, or None."""
    paths = sorted(
        glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "libscipy_openblas*.so*"))
    )
    try:
        with open("/proc/self/maps") as fh:
            paths += sorted({line.split()[-1] for line in fh if "openblas" in line.lower() and "/" in line})
    except OSError:
        pass
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in _OPENBLAS_NAMES:
            name = f"{prefix}%s{suffix}"
            if hasattr(lib, name % "get_num_threads") and hasattr(lib, name % "set_num_threads"):
                return lib, name
    return None


def fix_blas_threads(default: int = 1) -> dict[str, Any]:
    """Fix and report BLAS threads: a count set by the caller (OPENBLAS_NUM_THREADS / OMP_NUM_THREADS,
    read by OpenBLAS at load) is respected; otherwise `default` (1: the pipeline runs jobs side by
    side on few cores, where OpenBLAS threads spinning against each other are 10x slower)."""
    info: dict[str, Any] = {"numpy": np.__version__}
    env = {v: os.environ[v] for v in _THREAD_VARS if os.environ.get(v)}
    info["thread_env"] = env
    found = _openblas()
    if found is None:
        info["blas"] = "unknown (no OpenBLAS found in this process)"
        info["blas_threads"] = None
        info["blas_threads_source"] = "not controlled"
        return info
    lib, name = found
    count = next((int(v) for v in env.values() if v.strip().isdigit() and int(v) > 0), None if env else default)
    if count is not None:  # set even when the environment asked for it: take_row_workers may have lowered it
        getattr(lib, name % "set_num_threads")(count)
    get_config = getattr(lib, name % "get_config", None)
    if get_config is not None:
        get_config.restype = ctypes.c_char_p
        info["blas"] = get_config().decode(errors="replace").strip()
    else:
        info["blas"] = "OpenBLAS"
    info["blas_threads"] = int(getattr(lib, name % "get_num_threads")())
    info["blas_threads_source"] = "caller environment" if env else f"reference default {default}"
    return info


def take_row_workers(info: dict[str, Any]) -> int:
    """The reference's matmul threads: with n > 1 BLAS threads fixed, OpenBLAS goes down to one thread and
    the reference runs n row blocks of each matmul side by side instead (weights.WeightStore), so the
    expansion of int8 / F16 weights before each BLAS call is parallel too, not just the call. Recorded in
    `info` (blas_threads stays the count the reference computes with)."""
    n = int(info.get("blas_threads") or 1)
    found = _openblas()
    if n <= 1 or found is None:
        return 1
    lib, name = found
    getattr(lib, name % "set_num_threads")(1)
    info["matmul"] = f"{n} row-block threads, one BLAS thread each"
    return n
