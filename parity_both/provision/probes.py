"""Probes: is a backend there, and which one is it? Cheap and deterministic (no fetch, no build, no
timestamps), so they run while Snakemake builds the DAG.

``probe_lane_text`` is the probe stamp the workflow writes per lane (``write_if_changed``: only when
its content changes); the stamp is an input of the backend rule, so a vanished or changed backend
reruns that rule, and that rerun is the repair (parity_both.provision.provision.provision_lane).
Importing this module stays light (no numpy, no llama_cpp).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from parity_both.hashing import cache_dir as default_cache_dir
from parity_both.hashing import sha256_file
from parity_both.provision.build import ENGINE_RECORD, HarnessBuildError, engine_build_problem
from parity_both.provision.failures import BackendFailure
from parity_both.provision.harness import HarnessBuild, HarnessRunError, harness_source_digest, run_harness
from parity_both.provision.specs import (
    BackendSpec,
    build_key,
    digest,
    effective_spec,
    engine_name,
    lane_spec,
    pypi_name_version,
    slug,
    source_identity,
)


def python_probe(requirement: str) -> dict[str, Any]:
    """llama-cpp-python in THIS environment, by looking at files (cheap, no import): version,
    library directory, sha256 of libllama.so. Loading is proven by provision_backend (a subprocess)."""
    import importlib.metadata
    import importlib.util

    _, want = pypi_name_version(requirement)
    try:
        found = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        found = None
    if found is None or found.origin is None:
        return {"present": False, "problem": "llama_cpp is not installed in this environment"}
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        version = None
    lib_dir = Path(found.origin).parent / "lib"
    lib = lib_dir / "libllama.so"
    out: dict[str, Any] = {"present": True, "version": version, "lib_dir": str(lib_dir)}
    if not lib.is_file():
        out.update(present=False, problem=f"{lib} is missing")
        return out
    out["libllama_sha256"] = sha256_file(lib)
    if want and version != want:
        out.update(present=False, problem=f"installed llama-cpp-python {version} != pinned {want}")
    return out


def harness_dirs(spec: BackendSpec, cache_dir: Path, linked: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """(root of this backend's builds, harness dir for the current harness sources). A harness linked
    to an installed package is keyed by that package's library bytes AND directory: its run path
    points there, so another environment (another clone's venv) must not reuse it."""
    hdigest = harness_source_digest()[:16]
    if spec.source.type == "pypi":
        lk = linked or {}
        key = digest([spec.source.to_dict(), lk.get("libllama_sha256"), lk.get("lib_dir")])[:16]
        root = cache_dir / "links" / f"{slug(spec.name)}-{key}"
    else:
        root = cache_dir / "builds" / build_key(spec)
    return root, root / f"harness-{hdigest}"


def probe_backend(spec: BackendSpec, cache_dir: Path | str | None = None) -> dict[str, Any]:
    """Is the backend there, does it load, which version/revision. For the harness kind,
    ``parity_harness info`` is run (it loads the engine's libraries and reports what it loaded)."""
    spec = effective_spec(spec)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    out: dict[str, Any] = {
        "name": spec.name,
        "kind": spec.kind,
        "recipe": spec.recipe,
        "source": source_identity(spec),
        "engine": engine_name(spec),
    }
    try:
        if spec.kind == "python":
            out.update(python_probe(spec.source.requirement))
        elif spec.kind == "command":
            out.update(command_probe(spec))
        else:
            _probe_harness(spec, cache, out)
    except (HarnessRunError, HarnessBuildError, OSError, ValueError, KeyError, subprocess.TimeoutExpired) as exc:
        out.update(present=False, problem=f"{type(exc).__name__}: {exc}")
    return out


def command_program(spec: BackendSpec) -> Path | None:
    """The file whose bytes identify a command lane's engine (``binary``, else ``command[0]``)."""
    from parity_both.lanes.command import resolve_program

    return resolve_program(spec.binary or spec.command[0])


def command_probe(spec: BackendSpec) -> dict[str, Any]:
    """A command lane: its program's SHA-256 and its ``info`` status (minus ok/exit_code), so a
    rebuilt or upgraded engine changes the probe stamp and reruns exactly its lane."""
    from parity_both.lanes.command import PROTOCOL_VERSION
    from parity_both.provision.harness import run_program

    program = command_program(spec)
    if program is None:
        return {"present": False, "problem": f"{spec.binary or spec.command[0]}: no such program (yet)"}
    out: dict[str, Any] = {"binary": str(program), "binary_sha256": sha256_file(program)}
    res = run_program([*spec.command, "info"], timeout=120)
    st = res.status or {}
    if res.returncode != 0 or st.get("ok") is not True:
        detail = st.get("error") or res.stderr.strip()[-500:] or f"exit status {res.returncode}"
        out.update(present=False, problem=f"`{' '.join(spec.command)} info` failed: {detail}")
        return out
    if st.get("protocol") != PROTOCOL_VERSION:
        out.update(
            present=False,
            problem=f"the program speaks lane protocol {st.get('protocol')!r}, "
            f"this parity-both speaks {PROTOCOL_VERSION}",
        )
        return out
    info = {k: v for k, v in st.items() if k not in ("ok", "exit_code")}
    out.update(present=True, info=info, engine=str(info.get("engine") or spec.name))
    return out


def _probe_harness(spec: BackendSpec, cache_dir: Path, out: dict[str, Any]) -> None:
    linked_pkg = None
    if spec.source.type == "pypi":
        linked_pkg = python_probe(spec.source.requirement)
        out["linked_package"] = {k: linked_pkg.get(k) for k in ("version", "lib_dir", "libllama_sha256")}
        if not linked_pkg.get("present"):
            out.update(present=False, problem=linked_pkg.get("problem", "package missing"))
            return
    root, hdir = harness_dirs(spec, cache_dir, linked_pkg)
    out["key"] = root.name
    out["harness_dir"] = str(hdir)
    hjson = hdir / "harness.json"
    if not hjson.is_file():
        out.update(present=False, problem=f"no harness build at {hdir}")
        return
    build = HarnessBuild.load(hjson)
    own_engine = (root / "lib").exists() or (root / ENGINE_RECORD).exists()  # not a link to other libraries
    if own_engine or Path(build.lib_dir) == (root / "lib").resolve():
        problem = engine_build_problem(root)
        if problem is not None:
            out.update(present=False, problem=f"incomplete engine build: {problem}")
            return
    info = run_harness(build.harness_path, ["info"], timeout=60)
    libs = sorted(os.path.normpath(p) for p in info.get("libraries", []))
    llama_lib = next((p for p in libs if Path(p).name.startswith("libllama")), None)
    out.update(
        present=True,
        harness_path=build.harness_path,
        api_generation=info["api_generation"],
        api_features=info["api_features"],
        libraries=libs,
        system_info=info.get("system_info"),
        libllama_sha256=sha256_file(Path(llama_lib)) if llama_lib else None,
    )
    if linked_pkg is not None and (
        linked_pkg.get("libllama_sha256") != out["libllama_sha256"]
        or (llama_lib and os.path.realpath(Path(llama_lib).parent) != os.path.realpath(str(linked_pkg.get("lib_dir"))))
    ):
        out.update(present=False, problem="the harness does not load the installed llama-cpp-python library")


def probe_lane(
    lane: str, cache_dir: Path | str | None = None, config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A lane's probe (an unusable spec gives a probe saying so, not an exception: parse time)."""
    try:
        return probe_backend(lane_spec(lane, config), cache_dir)
    except BackendFailure as f:
        return {"name": lane, "present": False, "problem": f.message}


# Fields of a probe that depend on whether the build is there right now (not on WHICH build it is).
_STATE_FIELDS = ("present", "problem", "libraries", "api_generation", "api_features", "system_info", "harness_path")


def stable_probe(probe: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a probe that names WHICH backend is expected (spec, source revision, cache key,
    harness sources digest, and for linked/python backends the installed library's sha256) and is
    identical before and after a successful repair. Use it as the backend rule's param, and trigger
    the repair of a missing backend separately (e.g. remove the rule's output when
    ``probe["present"]`` is false): a param that embeds ``present`` changes again after the repair,
    and Snakemake then reruns the backend rule AND everything downstream one more time."""
    out = {k: v for k, v in probe.items() if k not in _STATE_FIELDS}
    if probe.get("kind") == "harness" and "linked_package" not in probe:
        out.pop("libllama_sha256", None)  # built by us: determined by the key
    return out


def stamp_text(probe: Mapping[str, Any]) -> str:
    """The probe stamp's content: the stable identity of the expected backend plus whether it is
    present now (deterministic JSON). Identical before and after a successful repair except for
    ``present``; a change of version/revision/flags changes it and reruns the backend rule."""
    return (
        json.dumps({"expected": stable_probe(probe), "present": bool(probe.get("present"))}, sort_keys=True, indent=1)
        + "\n"
    )


def probe_lane_text(lane: str, config: Mapping[str, Any] | None = None) -> str:
    """The probe stamp of a lane, probed now (parse time)."""
    return stamp_text(probe_lane(lane, config=config))


def stamp_can_capture(path: str | Path) -> bool:
    """Can the lane of this probe stamp capture graph nodes (kernel check, localization)? Every
    built-in kind can; a command lane only when its program's info lists the capture extension."""
    try:
        expected = json.loads(Path(path).read_text()).get("expected") or {}
    except (OSError, ValueError):
        return True  # no stamp yet: decided when there is one
    if expected.get("kind") != "command":
        return True
    return "capture" in ((expected.get("info") or {}).get("capabilities") or [])


def write_if_changed(path: str | Path, text: str) -> bool:
    """Write text to path atomically, only if the content differs (so mtimes move only on change)."""
    p = Path(path)
    try:
        if p.read_text() == text:
            return False
    except OSError:
        pass
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, p)
    return True


def loads_bitnet_format(lane: str, config: Mapping[str, Any] | None = None) -> bool:
    """Can this lane's engine load BitNet.cpp-format models (I2_S, the fork's key prefix)? Only a
    BitNet.cpp build can; mainline llama.cpp refuses type 36 and the `bitnet-b1.58` prefix."""
    try:
        return lane_spec(lane, config).recipe == "bitnet"
    except BackendFailure:
        return False
