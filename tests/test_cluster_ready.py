"""Cluster readiness without a cluster: every job of the demo plan declares threads, memory and runtime; and
concurrent processes building the same thing under the cache's build lock build it once."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

from parity_both.provision.lock import lock_path

from conftest import REPO


def test_every_planned_job_declares_threads_memory_and_runtime(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "report_plots",
            "-n",
            "--configfile",
            "config/demo.yaml",
            "--config",
            f"out_dir={tmp_path / 'results'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    jobs = re.split(r"\n(?=(?:local)?(?:rule|checkpoint) \w+:\n)", text)
    planned = [j for j in jobs if re.match(r"(?:local)?(?:rule|checkpoint) \w+:\n", j)]
    rules = {re.match(r"(?:local)?(?:rule|checkpoint) (\w+):", j).group(1) for j in planned}
    assert {"lane_eval", "reference", "receipt", "plot_receipt", "report_table"} <= rules
    for job in planned:
        name = job.split(":", 1)[0]
        if name.endswith("report_plots"):
            continue  # the target rule: no job of its own
        res = re.search(r"resources: (.*)", job)
        assert res and "mem_mb=" in res.group(1) and "runtime=" in res.group(1), job[:800]


BUILDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from parity_both.provision.lock import build_lock
    cache = Path(sys.argv[1])
    with build_lock(cache, "thing") as waited:
        if not (cache / "thing").exists():
            time.sleep(1.0)
            with open(cache / "builds.log", "a") as f:
                f.write(sys.argv[2] + "\\n")
            (cache / "thing").write_text("built")
    print(f"{waited:.2f}")
""")


def test_concurrent_builders_build_once(tmp_path: Path) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BUILDER, str(tmp_path), str(i)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len((tmp_path / "builds.log").read_text().split()) == 1  # one build, by whichever got the lock first
    waits = sorted(float(o[0]) for o in outs)
    assert waits[-1] >= 0.9  # the others waited for it
    assert lock_path(tmp_path, "thing").is_file()
