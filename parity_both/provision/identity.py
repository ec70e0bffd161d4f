"""A provisioned backend's identity: what the backend record and every receipt say about the engine
(deterministic: no timings, no timestamps), and the load check of the python kind."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from parity_both.provision import probes
from parity_both.provision.failures import EXIT_BUILD, BackendFailure
from parity_both.provision.fetch import run_to_log
from parity_both.provision.harness import HarnessBuild
from parity_both.provision.specs import BackendSpec


def python_load_check(log_path: Path) -> dict[str, Any]:
    """Import llama_cpp in a fresh interpreter: proves the library loads; returns its system info."""
    code = (
        "import json, llama_cpp; print(json.dumps({'system_info': "
        "llama_cpp.llama_print_system_info().decode(), 'module': llama_cpp.__file__}))"
    )
    proc = run_to_log([sys.executable, "-c", code], log_path, timeout=300)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["import failed"])[-1]
        raise BackendFailure(
            EXIT_BUILD,
            "verify",
            f"llama_cpp does not load: {last}",
            log_path=log_path,
            details={"returncode": proc.returncode},
        )
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


_ENGINE_FACTS = ("sdist", "sdist_sha256", "bitnet_lut_header", "git_url", "git_commit", "existing_build")


def backend_identity(spec: BackendSpec, probe: dict[str, Any], cache_dir: Path) -> dict[str, Any]:
    """The backend's identity (deterministic: no timings, no timestamps)."""
    ident: dict[str, Any] = {
        "name": spec.name,
        "engine": probe.get("engine"),
        "kind": spec.kind,
        "recipe": spec.recipe,
        "source": probe.get("source"),
    }
    if spec.kind == "command":
        info = probe.get("info") or {}
        ident.update(
            command=list(spec.command),
            binary=probe.get("binary"),
            binary_sha256=probe.get("binary_sha256"),
            info=info,
            protocol=info.get("protocol"),
            revision=info.get("engine_version") or f"sha256:{probe.get('binary_sha256')}",
        )
        return ident
    if spec.kind == "python":
        ident.update(
            package="llama-cpp-python",
            version=probe.get("version"),
            requirement=spec.source.requirement,
            revision=f"llama-cpp-python=={probe.get('version')}",
            api_generation="2025+",
            library_paths=[probe.get("lib_dir")],
            libllama_sha256=probe.get("libllama_sha256"),
        )
        return ident
    linked = probe.get("linked_package") or {}
    _, hdir = probes.harness_dirs(spec, cache_dir, linked)
    build = HarnessBuild.load(hdir / "harness.json")
    eng = build.engine
    src = probe.get("source") or {}
    ident.update(
        revision=src.get("commit") or src.get("revision") or spec.source.requirement,
        api_generation=build.api_generation,
        api_features=build.api_features,
        harness_path=build.harness_path,
        harness_digest=build.harness_digest,
        library_paths=probe.get("libraries"),
        libllama_sha256=probe.get("libllama_sha256"),
        system_info=probe.get("system_info"),
        compiler={"harness": build.compiler, "engine": eng.get("compiler")},
        build_flags={
            "engine_cmake_args": eng.get("cmake_args"),
            "engine_flags": eng.get("flags"),
            "harness_cmake_args": build.harness_cmake_args,
        },
        cache_path=str(hdir.parent),
        key=probe.get("key"),
    )
    ident.update({k: eng[k] for k in _ENGINE_FACTS if k in eng})
    if linked:
        ident["linked_package"] = linked
    return ident
