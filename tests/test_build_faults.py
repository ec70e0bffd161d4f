"""A half-built backend is never used: a backend build killed with SIGKILL mid-compile, then rerun, completes
with a correct backend and no partial record; an engine build whose completion record is missing, or whose
libraries differ from it, and a harness dir without its record are rebuilt, never loaded.

The tree built here is cheap but real: a CMake project whose `llama` target sleeps (the "compile" that gets
killed) and then produces the October-2024 llama.cpp libraries of an existing build (the one of the test cache,
else one built here), with that tree's headers, so the harness compiled against it is a working backend.
Every test uses its own cache directory: the shared cache is only read.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parity_both.config import CI_ENV_VARS
from parity_both.hashing import sha256_file
from parity_both.provision.build import engine_build_problem
from parity_both.provision.probes import harness_dirs, probe_backend
from parity_both.provision.provision import ENV_GUARD, ENV_REPAIR, provision_backend
from parity_both.provision.specs import spec_from_config

from conftest import kill_session, partial_dirs, slow_tree


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (*CI_ENV_VARS, ENV_REPAIR, ENV_GUARD):
        monkeypatch.delenv(var, raising=False)


def spec_cfg(tree: Path) -> dict:
    return {"kind": "harness", "source": {"type": "local", "path": str(tree)}}


def assert_correct(spec, cache: Path, engine: Path) -> dict:
    """The backend is present, and its harness loads the libraries built from the tree (the engine's bytes)."""
    probe = probe_backend(spec, cache)
    assert probe["present"] is True, probe
    root, _ = harness_dirs(spec, cache)
    assert engine_build_problem(root, verify_hashes=True) is None
    assert probe["libllama_sha256"] == sha256_file(engine / "lib" / "libllama.so")
    assert all(Path(p).is_relative_to(root.resolve()) for p in probe["libraries"] if "libllama" in p)
    return probe


def test_sigkill_during_a_backend_build_then_rerun_completes(tmp_path: Path, engine_2024: Path) -> None:
    tree = slow_tree(tmp_path / "tree", engine_2024, seconds=8)
    cfg, cache, out = tmp_path / "backends.json", tmp_path / "cache", tmp_path / "record.json"
    cfg.write_text(json.dumps({"slow": spec_cfg(tree)}))
    cmd = [sys.executable, "-m", "parity_both.provision.backends", "provision", "slow", "--config", str(cfg)]
    cmd += ["--cache-dir", str(cache), "--log", str(tmp_path / "build.log"), "--out", str(out), "--repair", "auto"]
    first = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while first.poll() is None and time.time() < deadline:
        log = tmp_path / "build.log"
        if log.exists() and "--target llama" in log.read_text():
            break
        time.sleep(0.05)
    assert first.poll() is None, "the build ended before it could be killed"
    time.sleep(1.0)  # inside the 8 s "compile"
    kill_session(first.pid)
    assert first.wait() == -signal.SIGKILL
    spec = spec_from_config("slow", spec_cfg(tree))
    assert not out.exists()  # no record of a backend that was never built
    left = partial_dirs(cache)
    assert left and all(p.startswith("builds/.tmp-") for p in left), left  # the half-build has no final name
    assert probe_backend(spec, cache)["present"] is False
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert partial_dirs(cache) == []  # the killed build's temporary dir was swept
    rec = json.loads(out.read_text())
    probe = assert_correct(spec, cache, engine_2024)
    assert rec["libllama_sha256"] == probe["libllama_sha256"] and rec["harness_path"] == probe["harness_path"]


def damage_engine_record(root: Path) -> None:
    (root / "engine.json").unlink()  # the build's completion record is gone
    lib = root / "lib" / "libllama.so"
    lib.write_bytes(lib.read_bytes()[: lib.stat().st_size // 2])  # and its library is half-written


def damage_library_size(root: Path) -> None:
    lib = root / "lib" / "libllama.so"
    lib.write_bytes(lib.read_bytes()[:4096])  # the record is there, the library is not what it lists


def damage_harness_record(root: Path) -> None:
    for hdir in root.glob("harness-*"):
        (hdir / "harness.json").unlink()


@pytest.mark.parametrize("damage", [damage_engine_record, damage_library_size, damage_harness_record])
def test_a_half_built_backend_is_rebuilt_never_loaded(tmp_path: Path, engine_2024: Path, damage) -> None:
    tree = slow_tree(tmp_path / "tree", engine_2024, seconds=0)
    spec, cache = spec_from_config("half", spec_cfg(tree)), tmp_path / "cache"
    provision_backend(spec, cache, tmp_path / "first.log", "auto")
    root, hdir = harness_dirs(spec, cache)
    assert_correct(spec, cache, engine_2024)
    damage(root)
    probe = probe_backend(spec, cache)  # the probe never runs the harness on a half-built engine
    assert probe["present"] is False, probe
    want = {"damage_harness_record": "no harness build", "damage_library_size": "bytes, its build record says"}
    assert want.get(damage.__name__, "no build record") in probe["problem"]
    ident = provision_backend(spec, cache, tmp_path / "second.log", "auto")
    assert_correct(spec, cache, engine_2024)
    assert ident["libllama_sha256"] == sha256_file(engine_2024 / "lib" / "libllama.so")
    log = (tmp_path / "second.log").read_text()
    assert ("--target llama" in log) == (damage is not damage_harness_record)  # the engine itself was rebuilt
    assert partial_dirs(cache) == []


def test_a_dead_builds_temporary_dir_is_swept_and_a_live_ones_kept(tmp_path: Path) -> None:
    from parity_both.provision.build import _owner, atomic_dir

    final = tmp_path / "builds" / "x-0123"
    child = subprocess.Popen(["sleep", "30"])
    child_pid = child.pid
    try:
        host = _owner().split("@")[0]
        gone = subprocess.Popen(["true"])
        gone.wait()
        stale = tmp_path / "builds" / f".tmp-x-0123@{host}@{gone.pid}@abc"
        live = tmp_path / "builds" / f".tmp-x-0123@{host}@{child_pid}@def"
        other = tmp_path / "builds" / f".tmp-x-0123@another-node@{gone.pid}@ghi"
        for d in (stale, live, other):
            (d / "lib").mkdir(parents=True)
            (d / "lib" / "libllama.so").write_bytes(b"half")
        with atomic_dir(final) as tmp:
            (tmp / "ok").write_text("1")
        names = sorted(p.name for p in final.parent.iterdir())
        assert names == sorted([final.name, live.name, other.name]), names
        assert (final / "ok").read_text() == "1"
    finally:
        child.kill()
        child.wait()
