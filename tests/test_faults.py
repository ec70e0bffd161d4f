"""Faults: a run killed with SIGKILL mid-job, then rerun into the same folder, completes with whole receipts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from parity_both.receipt import load_receipt, validate_receipt

CLI = [sys.executable, "-m", "parity_both.cli"]
ARGS = ("--lanes", "llama", "--max-tokens", "2", "--format", "json")


@pytest.mark.slow
@pytest.mark.parametrize("job_log", ["reference/prompt.log", "lanes/llama/prompt.log", "twin_F32"])
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
