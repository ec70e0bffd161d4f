"""Faults: a run killed with SIGKILL mid-job, then rerun into the same folder, completes with whole receipts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from parity_both.hashing import sha256_file
from parity_both.receipt import load_receipt, validate_receipt

CLI = [sys.executable, "-m", "parity_both.cli"]
ARGS = ("--lanes", "llama", "--max-tokens", "2", "--format", "json")


@pytest.mark.slow
@pytest.mark.parametrize("job_log", ["reference/prompt.log", "lanes/llama/prompt.log", "twin_auto"])
def test_sigkill_during_a_job_then_rerun_completes(tmp_path, job_log):
    out = tmp_path / "ci"
    first = subprocess.Popen(
        [*CLI, "--out-dir", str(out), *ARGS],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    logs = out / "results/logs/model"
    deadline = time.time() + 300
    while first.poll() is None and time.time() < deadline and not list(logs.glob(f"{job_log}*")):
        time.sleep(0.05)
    assert first.poll() is None, "the run ended before the job started"
    time.sleep(0.5)  # inside the job
    os.killpg(first.pid, signal.SIGKILL)  # the command, Snakemake and the job: no handler runs
    first.wait()
    assert (out / ".snakemake/locks").is_dir() and any((out / ".snakemake/locks").iterdir())
    p = subprocess.run([*CLI, "--out-dir", str(out), *ARGS], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "removed the lock of an interrupted run" in p.stderr
    doc = json.loads(p.stdout)
    assert doc["overall"]["exit_code"] == 0 and json.loads((out / "run.json").read_text())["run_id"] == doc["run"]["id"]
    r = load_receipt(out / "receipt_llama.json")
    validate_receipt(r)
    assert r["status"] == "pass"
    leftovers = [str(q) for q in (out / "results").rglob("*") if ".tmp" in q.name]
    assert not leftovers, leftovers


@pytest.mark.slow
def test_sigkill_during_a_backend_build_then_rerun_completes(tmp_path):
    """The backend job killed mid-compile (every process of the run, ninja's own process groups included),
    then the same command again: the build completes in the run's own cache, the backend record and the
    receipt are whole, and the killed build's temporary dir is gone."""
    import yaml

    from parity_both.fixtures import write_fixture

    from conftest import engine_2024_root, kill_session, partial_dirs, slow_tree

    tiny, cfg, out, cache = tmp_path / "tiny.gguf", tmp_path / "cfg.yaml", tmp_path / "ci", tmp_path / "cache"
    write_fixture(tiny, arch="llama", weight_type="F32", size="tiny")
    engine = engine_2024_root(tmp_path / "engine-cache")
    tree = slow_tree(tmp_path / "tree", engine, seconds=8)
    backend = {"kind": "harness", "source": {"type": "local", "path": str(tree)}}
    cfg.write_text(yaml.safe_dump({"backends": {"slow": backend}}))
    cmd = [*CLI, "--model-gguf", str(tiny), "--config", str(cfg), "--prompt-template", "raw", "--out-dir", str(out)]
    cmd += ["--lanes", "slow", "--max-tokens", "2", "--format", "json"]
    env = {**os.environ, "PARITY_BOTH_CACHE": str(cache), "PARITY_BOTH_REPAIR": "auto"}
    first = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    build_log = out / "results/logs/backends/slow.build.log"
    deadline = time.time() + 300
    while first.poll() is None and time.time() < deadline:
        if build_log.exists() and "--target llama" in build_log.read_text():
            break
        time.sleep(0.05)
    assert first.poll() is None, "the run ended before the build started"
    time.sleep(1.0)  # inside the 8 s compile
    kill_session(first.pid)
    first.wait()
    left = partial_dirs(cache)
    assert left and all(q.startswith("builds/.tmp-slow-") for q in left), left  # no final name for a half-build
    assert not (out / "results/backends/slow.json").exists()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(p.stdout)
    assert doc["overall"]["exit_code"] == 0 and partial_dirs(cache) == []
    record = json.loads((out / "results/backends/slow.json").read_text())
    r = load_receipt(out / "receipt_slow.json")
    validate_receipt(r)
    assert r["status"] == "pass"
    assert record["identity"]["libllama_sha256"] == sha256_file(engine / "lib" / "libllama.so")


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 64 KiB tmpfs (mounting needs CAP_SYS_ADMIN; without it the test cannot fill a disk safely)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        assert subprocess.run(["umount", str(mnt)]).returncode == 0


@pytest.mark.slow
def test_full_disk_during_a_receipt_write_leaves_the_old_receipt(tiny_filesystem):
    import errno

    from parity_both.receipt import write_json

    path = tiny_filesystem / "receipt_llama.json"
    write_json(path, {"version": 3, "status": "pass"})
    old = path.read_bytes()
    (tiny_filesystem / "filler").write_bytes(b"\0" * (60 << 10))
    with pytest.raises(OSError) as ei:
        write_json(path, {"version": 3, "rows": ["x" * 1000] * 100})
    assert ei.value.errno == errno.ENOSPC
    assert path.read_bytes() == old
    assert sorted(q.name for q in tiny_filesystem.iterdir()) == ["filler", "receipt_llama.json"]
