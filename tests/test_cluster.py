"""A real SLURM run (make test-cluster): a single-node cluster started on this machine, a small sweep through
`snakemake --executor slurm --profile profiles/slurm`, its verdicts equal to a local run's, the daemons stopped."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from parity_both.report.cluster_demo import cluster_demo

from conftest import REPO

pytestmark = pytest.mark.cluster


def test_slurm_run_has_the_local_verdicts(tmp_path: Path) -> None:
    out, local = "results-cluster-test", "results-cluster-test-local"
    for d in (out, local):
        shutil.rmtree(REPO / d, ignore_errors=True)
    result = cluster_demo(out, local, str(REPO / "config" / "cluster-small.yaml"), tmp_path / "slurm")
    assert result["verdicts"] and result["same_verdicts"], result
    assert len(result["verdicts"]) == 4  # 1 model x 2 prompts x 2 lanes
    # the jobs really ran under SLURM: the executor submitted every one with sbatch
    submitted = (REPO / out / "slurm-run.log").read_text().count("has been submitted with SLURM jobid")
    assert submitted >= 20, submitted
    summary = json.loads((REPO / out / "summary.json").read_text())
    assert set(summary["lanes"]) == {"llama", "llama-2024"}
    # the daemons were stopped
    assert set(result["daemon_pids"]) == {"slurmctld", "slurmd"}
    for name, pid in result["daemon_pids"].items():
        assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0, f"{name} still runs"
