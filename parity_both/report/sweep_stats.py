"""Run a sweep with Snakemake and report its figures: jobs, wall time, the scheduler's overhead per job and the
slowest rule (`make sweep`). Job durations come from Snakemake's own log (a timestamp before each job start and
each "Finished jobid"); the overhead per job is the part of the wall time the cores were not running jobs:
(wall x cores - sum of job durations) / jobs, i.e. DAG building, scheduling and the gaps between jobs.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
_STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
_START = re.compile(r"^(?:local)?(?:rule|checkpoint) (\S+):$")
_JOBID = re.compile(r"^\s+jobid: (\d+)$")
_DONE = re.compile(r"^Finished jobid: (\d+)")


def job_durations(log_text: str) -> list[dict[str, Any]]:
    """[{jobid, rule, start, end, seconds}] from a Snakemake log (1 s resolution)."""
    stamp, pending, jobs = None, None, {}
    for line in log_text.splitlines():
        if m := _STAMP.match(line.strip()):
            stamp = datetime.strptime(" ".join(m.group(1).split()), "%a %b %d %H:%M:%S %Y")
        elif m := _START.match(line.strip()):
            pending = (m.group(1), stamp)
        elif (m := _JOBID.match(line)) and pending:
            jobs[int(m.group(1))] = {"jobid": int(m.group(1)), "rule": pending[0], "start": pending[1]}
            pending = None
        elif (m := _DONE.match(line.strip())) and int(m.group(1)) in jobs:
            j = jobs[int(m.group(1))]
            j["end"] = stamp
            j["seconds"] = (stamp - j["start"]).total_seconds()
    return [j for j in jobs.values() if "seconds" in j]


def figures(log_text: str, wall: float, cores: int) -> dict[str, Any]:
    jobs = job_durations(log_text)
    per_rule: dict[str, list[float]] = defaultdict(list)
    for j in jobs:
        per_rule[j["rule"]].append(j["seconds"])
    busy = sum(j["seconds"] for j in jobs)
    real = [j for j in jobs if j["rule"] not in ("all", "report_plots")]
    slowest = max(per_rule.items(), key=lambda kv: sum(kv[1]), default=(None, []))
    longest = max(jobs, key=lambda j: j["seconds"], default=None)
    return {
        "jobs": len(real),
        "wall_s": round(wall, 1),
        "cores": cores,
        "busy_job_s": round(busy, 1),
        "scheduler_overhead_per_job_s": round((wall * cores - busy) / max(len(real), 1), 2),
        "slowest_rule_by_total": {
            "rule": slowest[0],
            "total_s": round(sum(slowest[1]), 1),
            "jobs": len(slowest[1]),
            "mean_s": round(sum(slowest[1]) / max(len(slowest[1]), 1), 1),
        },
        "longest_job": None if longest is None else {"rule": longest["rule"], "seconds": longest["seconds"]},
        "per_rule": {
            r: {"jobs": len(v), "total_s": round(sum(v), 1), "max_s": max(v)}
            for r, v in sorted(per_rule.items(), key=lambda kv: -sum(kv[1]))
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configfile", default="config/sweep.yaml")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--out", default=None, help="out_dir (default: the config's)")
    a = ap.parse_args(argv)
    import yaml

    out = a.out or yaml.safe_load(Path(a.configfile).read_text()).get("out_dir", "results")
    Path(out).mkdir(parents=True, exist_ok=True)
    plan = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            f"{out}/summary.json",
            "-n",
            "--quiet",
            "rules",
            "--configfile",
            a.configfile,
            "--config",
            f"out_dir={out}",
        ],
        capture_output=True,
        text=True,
    )
    log_path = Path(out) / "sweep-run.log"
    t0 = time.monotonic()
    with open(log_path, "w") as fh:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "snakemake",
                f"{out}/summary.json",
                "--cores",
                str(a.cores),
                "--configfile",
                a.configfile,
                "--config",
                f"out_dir={out}",
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    wall = time.monotonic() - t0
    stats = figures(log_path.read_text(), wall, a.cores)
    stats.update(returncode=proc.returncode, planned=plan.stdout.strip()[-2000:], configfile=a.configfile)
    (Path(out) / "sweep-stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True, default=str) + "\n")
    print(json.dumps({k: v for k, v in stats.items() if k not in ("per_rule", "planned")}, indent=2, default=str))
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
