"""Cheap backend probes (parse time) and the backend rule's body.

`probe_lane` runs while Snakemake builds the DAG, so it must stay cheap and import nothing heavy:
it looks at files (does the library exist, which version/revision) and returns a deterministic
string. The backend rule takes it as a param, so a vanished or changed backend reruns that rule,
and that rerun is the repair.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path
from typing import Any


def _llama_cpp_python_probe() -> dict[str, Any]:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return {"kind": "python", "present": False}
    lib = Path(spec.origin).parent / "lib" / "libllama.so"
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        version = None
    st = lib.stat() if lib.exists() else None
    return {"kind": "python", "present": st is not None, "version": version, "library": str(lib),
            "library_size": st.st_size if st else None, "library_mtime_ns": st.st_mtime_ns if st else None}


def probe_lane(lane: str) -> str:
    try:
        from parity_both import backends
    except ImportError:
        backends = None  # type: ignore[assignment]
    if backends is not None and hasattr(backends, "probe_lane"):
        return json.dumps(backends.probe_lane(lane), sort_keys=True)
    if lane == "llama":
        return json.dumps(_llama_cpp_python_probe(), sort_keys=True)
    return json.dumps({"lane": lane, "present": False, "reason": "unknown lane"}, sort_keys=True)


def provision_lane(lane: str, probe: str, repair: str, repair_why: str, log_path: str, threads: int) -> dict:
    try:
        from parity_both import backends
    except ImportError:
        backends = None  # type: ignore[assignment]
    if backends is not None and hasattr(backends, "provision_lane"):
        return backends.provision_lane(lane, json.loads(probe), repair=repair, repair_why=repair_why,
                                       log_path=log_path, threads=threads)
    if lane != "llama":
        raise ValueError(f"unknown lane {lane!r}")
    import llama_cpp

    info = json.loads(probe)
    return {
        "lane": lane, "kind": "python", "engine": "llama.cpp",
        "identity": {"engine": "llama.cpp", "kind": "python", "package": "llama-cpp-python",
                     "version": info.get("version"), "library_dir": os.path.dirname(info["library"]),
                     "module": llama_cpp.__file__},
        "probe": info, "repair": {"mode": repair, "why": repair_why, "performed": False},
    }
