"""S4/S5 of bench/bench.py: the whole workflow on the 2B-4T-shaped fixture (issue 13), no network.

One Snakemake run of the workflow `parity-both` runs (same Snakefile and profile, --cores 2), warm backends
(repair: never), lanes `llama` (on the transcoded TQ2_0 copy) and `llama-2024`, one raw prompt + 8 generated
tokens, two models on the same I2_S file: `silu` (the honest comparison: the activation the engines compute,
lossless twin `auto`) and `default` (bitnet-b1.58's default reference activation, relu2; twin off).
S4 reports every job's wall and peak RSS from the rules' `benchmark:` files (Snakemake samples the job's
process tree every 0.5 s for its first 15 s, then every 30 s: a short peak in a long job can be missed);
S5 checks the receipts: `silu` passes for both lanes, `default` fails with the relu2-vs-SiLU hint.

    python bench/bench_2b_run.py [I2S.gguf] [--keep DIR]      # alone (bench.py calls whole_run)
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
LANES = ["llama", "llama-2024"]
PROMPT = {"text": "What is the capital of France?", "template": "raw"}


def run_config(i2s: Path) -> dict[str, Any]:
    return {
        "standalone": True,
        "out_dir": "results",
        "models": {
            "silu": {"gguf": str(i2s), "activation": "silu"},
            "default": {"gguf": str(i2s), "twin": "off"},
        },
        "prompts": {"capital": PROMPT},
        "lanes": LANES,
        "max_tokens": 8,
        "threads": 1,
        "repair": "never",
    }


def job_table(results: Path) -> list[dict[str, Any]]:
    """Every job's benchmark record (results/benchmarks/**.tsv): name, wall s, peak RSS MB (NaN: not sampled)."""
    out = []
    for tsv in sorted((results / "benchmarks").rglob("*.tsv")):
        with open(tsv) as fh:
            rec = next(csv.DictReader(fh, delimiter="\t"), None)
        if rec is None:
            continue

        def num(key: str, rec: dict[str, str] = rec) -> float:
            try:
                return float(rec.get(key) or "nan")
            except ValueError:
                return math.nan

        name = str(tsv.relative_to(results / "benchmarks").with_suffix(""))
        out.append({"job": name, "wall_s": num("s"), "max_rss_mb": num("max_rss")})
    return out


def receipts_check(results: Path) -> dict[str, Any]:
    """Per model and lane: the receipt's status, mean KL, reference activation; and whether the finding holds."""
    seen: dict[str, Any] = {}
    for model in ("silu", "default"):
        for lane in LANES:
            path = results / model / "receipts" / lane / "capital.json"
            if not path.exists():
                seen[f"{model}/{lane}"] = {"status": "missing"}
                continue
            r = json.loads(path.read_text())
            hints = r.get("summary", {}).get("hints", [])
            seen[f"{model}/{lane}"] = {
                "status": r.get("status"),
                "mean_kl": r.get("summary", {}).get("mean_kl"),
                "activation": r.get("reference_settings", {}).get("activation"),
                "relu2_hint": any("relu2" in h and "SiLU" in h for h in hints),
            }
    honest = all(seen[f"silu/{lane}"].get("status") == "pass" for lane in LANES)
    finding = all(
        seen[f"default/{lane}"].get("status") == "fail"
        and seen[f"default/{lane}"].get("activation") == "relu2"
        and seen[f"default/{lane}"].get("relu2_hint")
        for lane in LANES
    )
    return {"receipts": seen, "honest_pass": honest, "relu2_finding": finding}


def whole_run(i2s: Path, work: Path) -> dict[str, Any]:
    """Run the workflow in `work` on `i2s`; its wall, exit code, job table and receipt check."""
    from parity_both.cli import snakemake_cmd  # noqa: PLC0415 - the command parity-both itself runs

    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "config.yaml"
    cfg.write_text(yaml.safe_dump(run_config(i2s), sort_keys=True))
    t0 = time.perf_counter()
    with open(work / "workflow.log", "w") as log:
        cmd = snakemake_cmd(cfg, work, 2, "results/summary.json")
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    wall = time.perf_counter() - t0
    results = work / "results"
    return {"wall_s": wall, "rc": rc, "jobs": job_table(results), **receipts_check(results)}


def _fmt_rss(mb: float) -> str:
    return "n/s" if math.isnan(mb) else f"{mb:.0f} MB"


def rows(run: dict[str, Any], row: Callable[..., dict[str, Any]]) -> list[dict[str, Any]]:
    """S4 (total, then one row per job, slowest first) and S5 (receipts)."""
    jobs = run["jobs"]
    peak = max((j for j in jobs if not math.isnan(j["max_rss_mb"])), key=lambda j: j["max_rss_mb"], default=None)
    top = f", largest peak RSS {_fmt_rss(peak['max_rss_mb'])} ({peak['job']})" if peak else ""
    out = [
        row(
            "S4",
            f"whole run, 2 models x lanes {'+'.join(LANES)}, warm backends: {run['wall_s']:.0f} s, "
            f"exit {run['rc']}, {len(jobs)} jobs{top}",
            "report",
            None if run["rc"] == 0 else False,
        )
    ]
    for j in sorted(jobs, key=lambda j: -j["wall_s"] if not math.isnan(j["wall_s"]) else 0):
        out.append(row("S4", f"  {j['job']}: {j['wall_s']:.1f} s, {_fmt_rss(j['max_rss_mb'])}", "report", None))
    got = run["receipts"]
    kl = ", ".join(f"{k} {v.get('status')} (KL {v.get('mean_kl') or float('nan'):.2g})" for k, v in got.items())
    out.append(
        row(
            "S5",
            f"receipts: {kl}",
            "silu pass, relu2 fail+hint",
            run["honest_pass"] and run["relu2_finding"],
        )
    )
    return out


def main() -> int:
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "bench"))
    from bench_2b import BENCH_STORE  # noqa: PLC0415

    from bench import print_table, row  # noqa: PLC0415

    args = sys.argv[1:]
    store = Path(os.environ.get("PARITY_BOTH_CACHE", Path.home() / ".cache/parity-both")) / BENCH_STORE / "i2s.gguf"
    i2s = Path(args[0]) if args and not args[0].startswith("--") else store
    work = Path(args[args.index("--keep") + 1]) if "--keep" in args else Path("/tmp/bench-2b4t-run")
    run = whole_run(i2s, work)
    (work / "run.json").write_text(json.dumps(run, indent=1, sort_keys=True))
    print_table(rows(run, row))
    return 0 if run["rc"] == 0 and run["honest_pass"] and run["relu2_finding"] else 1


if __name__ == "__main__":
    sys.exit(main())
