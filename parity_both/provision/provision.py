"""Provisioning: make a backend usable (build or install what is missing, when the repair mode
allows) and return its identity; the backend rule's body (``provision_lane``).

One pass: the repair mode is resolved once (``resolve_repair_mode``) and the backend probed once; a
repair adds exactly one more probe, which verifies the result. Builds happen in temporary
directories renamed into the cache at the end, so a failure leaves nothing partial. Failures are
``BackendFailure`` (parity_both.provision.failures: exit codes 2-6).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from parity_both.config import ci_detected
from parity_both.hashing import cache_dir as default_cache_dir
from parity_both.provision import probes
from parity_both.provision.build import HarnessBuildError, Progress, append_log, find_llama_tree, retire_dir
from parity_both.provision.failures import (
    EXIT_BUILD,
    EXIT_MISSING,
    EXIT_NETWORK,
    EXIT_PERMISSION,
    EXIT_RECURSION,
    EXIT_SOURCE,
    RECURSION_REFUSED,
    BackendFailure,
    classify_build_error,
    classify_os_error,
    nested_repair_failure,
)
from parity_both.provision.fetch import SOURCE_META, check_writable, ensure_source, run_pip, run_to_log
from parity_both.provision.harness import build_harness
from parity_both.provision.identity import backend_identity, python_load_check
from parity_both.provision.lock import build_lock
from parity_both.provision.specs import BackendSpec, effective_spec, lane_spec, slug

ENV_REPAIR = "PARITY_BOTH_REPAIR"
ENV_GUARD = "PARITY_BOTH_REPAIRING"
ENV_REFUSALS = "PARITY_BOTH_REPAIR_REFUSALS"  # the file a refused nested repair signs (see _repair_guard)
REPAIR_MODES = ("auto", "never", "always")

# ============================================================================================ repair mode


class RepairMode(NamedTuple):
    mode: str  # auto | never | always
    why: str  # how it was decided (recorded in the backend record, named in failures)


def resolve_repair_mode(
    requested: str | None = None,
    env: Mapping[str, str] | None = None,
    *,
    requested_by: str = "requested explicitly",
) -> RepairMode:
    """``auto`` (build/install what is missing), ``never``, or ``always`` (rebuild/reinstall even when
    present). An explicit request (config ``repair:``, ``--repair``) > $PARITY_BOTH_REPAIR > ``never``
    when a CI variable is set > ``auto``. ``None``, ``""`` and ``default`` mean "not requested"."""
    env = os.environ if env is None else env
    allowed = f"one of {', '.join(REPAIR_MODES)} or default"
    if requested not in (None, "", "default"):
        if requested not in REPAIR_MODES:
            raise BackendFailure(EXIT_SOURCE, "spec", f"repair mode must be {allowed}, not {requested!r}")
        return RepairMode(str(requested), requested_by)
    forced = (env.get(ENV_REPAIR) or "").strip().lower()
    if forced not in ("", "default"):
        if forced not in REPAIR_MODES:
            raise BackendFailure(EXIT_SOURCE, "spec", f"{ENV_REPAIR} must be {allowed}, not {forced!r}")
        return RepairMode(forced, f"set by {ENV_REPAIR}")
    ci_var = ci_detected(env)
    if ci_var:
        return RepairMode("never", f"CI environment detected: {ci_var} is set")
    return RepairMode("auto", "default for interactive use")


def repair_command(spec: BackendSpec, cache_dir: Path) -> str:
    if spec.kind == "command":
        return (
            f"build {spec.binary or spec.command[0]} (or give backend '{spec.name}' `build:` steps) and run "
            f"`parity-both lane-check --backend {spec.name}`"
        )
    cmd = (
        f"{ENV_REPAIR}=auto {shlex.quote(sys.executable)} -m parity_both.provision.backends provision "
        f"{shlex.quote(spec.name)} --cache-dir {shlex.quote(str(Path(cache_dir).resolve()))} --repair auto"
    )
    if spec.kind == "python" or spec.source.type == "pypi":
        cmd += f"   (or: {shlex.quote(sys.executable)} -m pip install {shlex.quote(spec.source.requirement)})"
    return cmd


def build_log_path(log_path: Path | str) -> Path:
    """Where the full fetch/configure/compiler output goes: beside the rule's log, as *.build.log
    (a separate file: the rule's own log is opened for writing by the job wrapper)."""
    p = Path(log_path)
    stem = p.name[:-4] if p.name.endswith(".log") else p.name
    return p.with_name(stem + ".build.log")


# ============================================================================================ provision


class Provisioned(NamedTuple):
    identity: dict[str, Any]
    probe: dict[str, Any]  # the probe of the usable backend (after the repair, if one ran)
    repaired: bool


def provision_backend(
    spec: BackendSpec,
    cache_dir: Path | str | None,
    log_path: Path | str,
    repair: str | RepairMode | None = None,
    *,
    retries: int = 3,
    backoff: float = 2.0,
    jobs: int = 2,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Make the backend usable (build/install if missing and repair allows) and return its identity.

    log_path receives the full build output (pass the rule's build log, see build_log_path).
    Progress lines go to stderr. Raises BackendFailure; on failure nothing partial is left in the
    cache (builds happen in temporary dirs renamed at the end)."""
    return ensure_backend(
        spec, cache_dir, log_path, repair, retries=retries, backoff=backoff, jobs=jobs, progress=progress
    ).identity


def ensure_backend(
    spec: BackendSpec,
    cache_dir: Path | str | None,
    log_path: Path | str,
    repair: str | RepairMode | None = None,
    *,
    retries: int = 3,
    backoff: float = 2.0,
    jobs: int = 2,
    progress: Progress | None = None,
) -> Provisioned:
    """provision_backend, also returning the probe it took and whether it repaired."""
    spec = effective_spec(spec)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    log_path = Path(log_path)
    progress = progress or Progress(f"backend {spec.name}")
    try:
        _check_log_writable(log_path)
        mode = repair if isinstance(repair, RepairMode) else resolve_repair_mode(repair)
        probe = probes.probe_backend(spec, cache)
        repaired = not probe.get("present") or mode.mode == "always"
        if repaired:
            problem = "rebuild requested (repair=always)" if probe.get("present") else probe.get("problem", "missing")
            _refuse_repair_unless_allowed(spec, cache, log_path, mode, problem)
            progress("repair", problem)
            force = mode.mode == "always"
            opts = {"force": force, "retries": retries, "backoff": backoff, "jobs": jobs, "progress": progress}
            probe = _repair_locked(spec, cache, log_path, opts)
            if not probe.get("present"):
                raise BackendFailure(
                    EXIT_BUILD,
                    "verify",
                    f"provisioned, but still not usable: {probe.get('problem')}",
                    log_path=log_path,
                )
        else:
            progress("present", probe.get("key") or probe.get("version") or "")
        ident = backend_identity(spec, probe, cache)
        if spec.kind == "python":
            ident["system_info"] = python_load_check(log_path)["system_info"]
    except BackendFailure as f:
        f.backend = f.backend or spec.name
        raise
    if repaired:
        progress("ready", probe.get("key") or probe.get("version") or "")
    return Provisioned(ident, probe, repaired)


def _repair_locked(spec: BackendSpec, cache: Path, log_path: Path, opts: dict[str, Any]) -> dict[str, Any]:
    """Repair holding the backend's build lock (parity_both.provision.lock): concurrent jobs, or cluster nodes
    sharing the cache, never build the same backend twice - a waiter finds it built and reuses it. Returns the
    probe taken after the repair."""
    with build_lock(cache, f"backend-{spec.name}") as waited:
        if waited > 0 and not opts["force"]:  # another job held the lock: it may have built this backend
            probe = probes.probe_backend(spec, cache)
            if probe.get("present"):
                opts["progress"]("present", "built by a concurrent job")
                return probe
        _repair_guarded(spec, cache, log_path, **opts)
    return probes.probe_backend(spec, cache)


def _check_log_writable(log_path: Path) -> None:
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a"):
            pass
    except OSError as exc:
        raise BackendFailure(
            EXIT_PERMISSION,
            "prepare",
            f"cannot write the log {log_path}: {exc.strerror or exc}",
            details={"errno": exc.errno, "path": str(log_path)},
        ) from exc


def _refuse_repair_unless_allowed(
    spec: BackendSpec, cache_dir: Path, log_path: Path, mode: RepairMode, problem: str
) -> None:
    """Exit 2 when repair is disabled, 6 when a repair is already running (no recursion)."""
    if mode.mode == "never":
        raise BackendFailure(
            EXIT_MISSING,
            "probe",
            f"backend '{spec.name}' is not usable ({problem}) and repair is disabled ({mode.why})",
            log_path=log_path,
            hint=f"to repair it run: {repair_command(spec, cache_dir)}",
            details={"problem": problem},
        )
    if os.environ.get(ENV_GUARD):
        _sign_refusal(spec)
        raise BackendFailure(
            EXIT_RECURSION,
            "guard",
            f"backend '{spec.name}' needs a repair, but a repair is "
            f"already running ({ENV_GUARD}={os.environ[ENV_GUARD]}): {RECURSION_REFUSED}",
            log_path=log_path,
            hint=f"unset {ENV_GUARD} if no provisioning is running",
        )


@contextlib.contextmanager
def _repair_guard(name: str) -> Iterator[Path]:
    """Set the guard (and the file where refused nested repairs sign in) for everything the repair starts;
    yields that file. Both are this repair's own: the previous values come back after it."""
    old = {k: os.environ.get(k) for k in (ENV_GUARD, ENV_REFUSALS)}
    fd, refusals = tempfile.mkstemp(prefix=f"parity-both-{slug(name)}-", suffix=".nested")  # not in results/
    os.close(fd)
    os.environ.update({ENV_GUARD: name, ENV_REFUSALS: refusals})
    try:
        yield Path(refusals)
    finally:
        Path(refusals).unlink(missing_ok=True)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _sign_refusal(spec: BackendSpec) -> None:
    """Tell the repair that started us (whatever ran in between: a build step, Snakemake, parity-both)
    that we were a nested repair it must report as such."""
    with contextlib.suppress(OSError, KeyError):
        with open(os.environ[ENV_REFUSALS], "a") as fh:
            fh.write(f"{spec.name}\n")


def _repair_guarded(spec: BackendSpec, cache_dir: Path, log_path: Path, **opts: Any) -> None:
    """_repair under the recursion guard, with build and OS errors classified; a step that failed
    because a repair it started was refused (signed in the refusals file) is a nested repair (6)."""
    with _repair_guard(spec.name) as refusals:
        try:
            try:
                _repair(spec, cache_dir, log_path, **opts)
            except HarnessBuildError as exc:
                raise classify_build_error(exc, log_path) from exc
            except OSError as exc:
                failure = classify_os_error(exc, log_path)
                if failure is None:
                    raise
                raise failure from exc
        except BackendFailure as f:
            nested = refusals.read_text().split("\n")[0] if refusals.exists() else ""
            if nested and f.code != EXIT_RECURSION:
                raise nested_repair_failure(f"{f.phase}: {f.message.splitlines()[0]}", nested, log_path) from f
            raise


# ============================================================================================ repair


def _repair(
    spec: BackendSpec,
    cache_dir: Path,
    log_path: Path,
    *,
    force: bool,
    retries: int,
    backoff: float,
    jobs: int,
    progress: Progress,
) -> None:
    """Install the package (pypi sources) and/or build the harness, as the spec says."""
    check_writable(cache_dir, log_path)
    if spec.kind == "command":
        _build_command(spec, log_path, progress)
        return
    fetch = {"retries": retries, "backoff": backoff, "progress": progress}
    if spec.source.type == "pypi":
        py = _install_package(spec, log_path, force=force, **fetch)
        if spec.kind == "harness":
            _link_harness(spec, cache_dir, log_path, py, force=force, jobs=jobs, **fetch)
        return
    src = ensure_source(spec, cache_dir, log_path, **fetch)
    root, _ = probes.harness_dirs(spec, cache_dir)
    if force:
        retire_dir(root)
    if spec.existing_dir and _harness_on_existing_build(spec, src, root, log_path, jobs, progress):
        return
    _build_from_source(spec, src, root, log_path, jobs, progress)


def _build_command(spec: BackendSpec, log_path: Path, progress: Progress) -> None:
    """A command lane's ``build:`` steps (argv lists, no shell), in order, output to the build log."""
    if not spec.build:
        problem = probes.command_probe(spec).get("problem")
        raise BackendFailure(
            EXIT_MISSING,
            "probe",
            f"backend '{spec.name}' is not usable ({problem}) and has no `build:` steps",
            log_path=log_path,
            hint="build the program, fix `command:`/`binary:`, or add `build:` steps to the backend",
        )
    cwd = Path(spec.build_cwd) if spec.build_cwd else None
    for step in spec.build:
        progress("build", " ".join(step))
        try:
            proc = run_to_log(list(step), log_path, cwd=cwd)
        except FileNotFoundError as exc:
            raise BackendFailure(
                EXIT_BUILD,
                "build",
                f"build step {list(step)}: {exc.strerror}: {exc.filename}",
                log_path=log_path,
                details={"errno": exc.errno, "command": list(step)},
            ) from exc
        if proc.returncode != 0:
            raise BackendFailure(
                EXIT_BUILD,
                "build",
                f"build step {list(step)} failed (exit status {proc.returncode})",
                log_path=log_path,
                details={"returncode": proc.returncode, "command": list(step)},
            )


def _install_package(
    spec: BackendSpec, log_path: Path, *, force: bool, retries: int, backoff: float, progress: Progress
) -> dict[str, Any]:
    """pip install the pinned requirement when missing (or reinstall: force on the python kind)."""
    req = spec.source.requirement
    py = probes.python_probe(req)
    if py.get("present") and not (force and spec.kind == "python"):
        return py
    extra = ["--force-reinstall", "--no-deps"] if force and py.get("present") else []
    run_pip(
        ["install", *extra, req],
        f"pip install {req}",
        log_path,
        retries=retries,
        backoff=backoff,
        progress=progress,
        phase="install",
    )
    py = probes.python_probe(req)
    if not py.get("present"):
        problem = py.get("problem")
        raise BackendFailure(EXIT_BUILD, "install", f"installed, but not usable: {problem}", log_path=log_path)
    return py


def _link_harness(
    spec: BackendSpec,
    cache_dir: Path,
    log_path: Path,
    py: Mapping[str, Any],
    *,
    force: bool,
    jobs: int,
    retries: int,
    backoff: float,
    progress: Progress,
) -> None:
    """The harness linked to the installed package's libraries, with the same version's sdist headers."""
    s = spec.source
    src = ensure_source(
        replace(spec, source=replace(s, type="sdist")),
        cache_dir,
        log_path,
        retries=retries,
        backoff=backoff,
        progress=progress,
    )
    tree = find_llama_tree(src)
    root, hdir = probes.harness_dirs(spec, cache_dir, py)
    if force:
        retire_dir(hdir)
    build_harness(
        root,
        log_path,
        lib_dir=Path(py["lib_dir"]),
        include_dirs=[tree / "include", tree / "ggml" / "include"],
        cxx=spec.cxx,
        jobs=jobs,
        progress=progress,
    )
    linked = {"requirement": s.requirement, "version": py.get("version"), "lib_dir": py.get("lib_dir")}
    _merge_engine_record(root, {"linked_package": linked})


def _harness_on_existing_build(
    spec: BackendSpec, src: Path, root: Path, log_path: Path, jobs: int, progress: Progress
) -> bool:
    """An existing checkout (BITNET_CPP_DIR, existing_dir) that holds a build: link the harness to
    that build's libraries instead of building the engine. False when there is no build in it."""
    libs = sorted(src.glob("build/**/libllama.so"))
    if not libs:
        return False
    lib_dir = libs[0].parent
    tree = find_llama_tree(src)
    progress("existing build", str(lib_dir))
    build_harness(
        root,
        log_path,
        lib_dir=lib_dir,
        include_dirs=[tree / "include", tree / "ggml" / "include"],
        cxx=spec.cxx,
        jobs=jobs,
        progress=progress,
    )
    _merge_engine_record(root, {"existing_build": str(lib_dir)})
    return True


def _build_from_source(spec: BackendSpec, src: Path, root: Path, log_path: Path, jobs: int, progress: Progress) -> None:
    """Build the engine from the source tree (the recipe's compilers and flags), then the harness."""
    for tool in (spec.cc, spec.cxx):
        if tool and not shutil.which(tool):
            raise BackendFailure(
                EXIT_BUILD,
                "configure",
                f"compiler {tool} not found (the {spec.recipe} recipe needs it"
                + (": BitNet.cpp's CMake refuses anything but clang)" if spec.recipe == "bitnet" else ")"),
                log_path=log_path,
                hint="apt-get install -y clang" if "clang" in tool else f"install {tool}",
                details={"errno": errno.ENOENT, "command": [tool]},
            )
    s = spec.source
    project = src / s.subdir if s.subdir and s.type == "local" else src
    lut_note = prepare_bitnet_tree(project, log_path) if spec.recipe == "bitnet" else None
    build_harness(
        root,
        log_path,
        engine_src=project,
        cc=spec.cc,
        cxx=spec.cxx,
        extra_cmake_args=spec.cmake_args,
        jobs=jobs,
        progress=progress,
    )
    extra: dict[str, Any] = {}
    if lut_note:
        extra["bitnet_lut_header"] = lut_note
    for meta in (project / SOURCE_META, src / SOURCE_META):
        if meta.is_file():
            extra.update(json.loads(meta.read_text()))
    if extra:
        _merge_engine_record(root, extra)


_EMPTY_LUT_HEADER = """// Written by parity-both: an I2_S-only build (BITNET_X86_TL2=OFF / BITNET_ARM_TL1=OFF)
// needs this header to exist; every use of its contents is guarded by GGML_BITNET_X86_TL2 / _ARM_TL1.
#pragma once
"""


def prepare_bitnet_tree(root: Path, log_path: Path) -> str:
    """BitNet.cpp's CMake needs include/bitnet-lut-kernels.h even for I2_S-only builds. Copy a
    preset one (what BitNet's setup_env.py does) or write an empty guarded one. Returns what was done."""
    target = root / "include" / "bitnet-lut-kernels.h"
    presets = sorted((root / "preset_kernels").glob("*/bitnet-lut-kernels-tl2.h"))
    if target.exists():  # the checkout's own, or ours from an earlier run on this checkout: say which
        have = target.read_bytes()
        if presets and have == presets[0].read_bytes():
            return f"copied {presets[0].relative_to(root)}"
        return "wrote an empty guarded header" if have == _EMPTY_LUT_HEADER.encode() else "present"
    target.parent.mkdir(parents=True, exist_ok=True)
    if presets:
        shutil.copy2(presets[0], target)
        what = f"copied {presets[0].relative_to(root)}"
    else:
        target.write_text(_EMPTY_LUT_HEADER)
        what = "wrote an empty guarded header"
    append_log(log_path, f"[bitnet] include/bitnet-lut-kernels.h: {what}\n")
    return what


def _merge_engine_record(root: Path, extra: dict[str, Any]) -> None:
    """Add source facts to engine.json and every harness.json below root (atomically per file)."""
    for path in [root / "engine.json", *root.glob("harness-*/harness.json")]:
        if not path.is_file():
            continue
        rec = json.loads(path.read_text())
        target = rec if path.name == "engine.json" else rec.setdefault("engine", {})
        if all(target.get(k) == v for k, v in extra.items()):
            continue
        target.update(extra)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(rec, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)


# ============================================================================================ the job


def provision_lane(
    lane: str,
    stamp: Path | str | None = None,
    *,
    repair: str | None = None,
    repair_why: str = "set in config (repair:)",
    log_path: Path | str,
    threads: int = 2,
    cache_dir: Path | str | None = None,
    config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The backend rule's body: provision (if needed and allowed) and return the backend record the
    lanes consume (``HarnessLane.from_backend``). ``repair`` is the requested mode (config
    ``repair:``, recorded with ``repair_why``; None: decided by the environment). Full build output
    goes to build_log_path(log_path). With ``stamp``, the probe stamp is refreshed from this job's
    probe (written only when it changed), so the next run sees the backend present and has nothing to
    do. Raises BackendFailure (``code``, ``kind``, ``record``) for the job wrapper.

    The record is deterministic: the same backend gives byte-identical JSON whether or not this run
    had to repair it (what was repaired is logged on stderr, i.e. the rule's log), so Snakemake's
    checksum of the record keeps downstream jobs up to date after a repair-free rerun."""
    spec: BackendSpec | None = None
    try:
        spec = lane_spec(lane, config)
        mode = resolve_repair_mode(repair, requested_by=repair_why)
        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        build_log = build_log_path(log_path)
        print(f"backend {lane}: repair mode {mode.mode} ({mode.why}); build output: {build_log}", file=sys.stderr)
        done = ensure_backend(spec, cache, build_log, mode, jobs=max(1, min(int(threads), 2)))
    except BackendFailure as f:
        f.backend = f.backend or lane
        if spec is not None and f.code == EXIT_NETWORK and spec.existing_dir_env:
            f.hint = (
                f"{f.hint}; or set {spec.existing_dir_env} to an existing checkout/build "
                "(skips the clone), or run the offline lanes: make demo"
            )
        raise
    print(f"backend {lane}: {'repaired' if done.repaired else 'already present'}", file=sys.stderr)
    record: dict[str, Any] = {
        "lane": lane,
        "kind": spec.kind,
        "engine": done.identity.get("engine"),
        "identity": done.identity,
        "probe": done.probe,
        "repair": {"mode": mode.mode, "why": mode.why},
    }
    if spec.kind == "harness":
        record["harness"] = done.identity["harness_path"]
    if stamp is not None:
        probes.write_if_changed(stamp, probes.stamp_text(done.probe))
    return record
