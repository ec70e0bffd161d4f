"""S rows of bench/bench.py: BitNet b1.58 2B-4T-shaped fixture (issue 13), no network.

S0 fixture build (I2_S, bitnet-b1.58, size 2b4t) and its mainline transcode (TQ2_0 for the llama
lane); S1 reference peak RSS <= model file + 1 GB; S2 reference wall <= 3x the llama lane's wall,
both whole processes on 40 tokens + 8 generated on 2 threads, the better of two runs each; S3
prepared cache + twin (`auto`) on disk <= 6x the model file, with their build times (each job's
wall and peak RSS, its own VmHWM from bench/hwm.py, in S0); S4/S5 the whole workflow on it, two
lanes, per-job wall and peak RSS, and its receipts (bench_2b_run.py).
The fixture and its transcode are kept in $PARITY_BOTH_CACHE/BENCH_STORE (rebuilt when missing).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
N_PROMPT, N_GEN = 40, 8
GB = 2**30
# under $PARITY_BOTH_CACHE; renamed when the generator's 2b4t bytes change (v2: fixtures._embed_std)
BENCH_STORE = "bench-2b4t-v2"

LANE_CODE = f"""
import sys, numpy as np, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_batch=64, n_threads=2, logits_all=True, verbose=False)
llm.eval(list(range(1000, 1000 + {N_PROMPT})))
for _ in range({N_GEN}):
    llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
"""

REF_CODE = f"""
import sys
from parity_both.reference import run_reference
run_reference(sys.argv[1], list(range(1000, 1000 + {N_PROMPT})), {N_GEN}, prepared_dir=sys.argv[2])
"""

PREP_CODE = """
import sys
from parity_both.reference import prepare_weights
prepare_weights(sys.argv[1], sys.argv[2], budget_factor=float(sys.argv[3]) if len(sys.argv) > 3 else None)
"""


def job(name: str, work: Path, args: list[str]) -> dict[str, Any]:
    """Run `python bench/hwm.py` on args; its wall and own peak RSS (stderr -> work/name.log)."""
    out = work / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "2"}
    with open(work / f"{name}.log", "w") as log:
        p = subprocess.run([PY, str(REPO / "bench" / "hwm.py"), str(out), *args], stdout=log, stderr=log, env=env)
    rec = json.loads(out.read_text()) if out.exists() else {"wall_s": float("nan"), "vmhwm_mb": float("nan")}
    rec["rc"] = p.returncode
    if p.returncode:
        print(f"bench-2b: {name} failed ({p.returncode}), see {work / (name + '.log')}", file=sys.stderr)
    return rec


def _fixtures(store: Path, jobs: dict[str, dict[str, Any]]) -> tuple[Path, Path]:
    i2s, tq2 = store / "i2s.gguf", store / "mainline-tq2_0.gguf"
    store.mkdir(parents=True, exist_ok=True)
    if not i2s.exists():
        fx = ["-m", "parity_both.fixtures", "--arch", "bitnet-b1.58", "--weight-type", "I2_S", "--size", "2b4t"]
        jobs["fixture"] = job("fixture", store, [*fx, str(i2s)])
    if not tq2.exists():
        jobs["transcode"] = job("transcode", store, ["-m", "parity_both.gguf.transcode", str(i2s), str(tq2)])
    return i2s, tq2


def _du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _twin_dtype(twin: Path) -> str:
    from parity_both.gguf.reader import read_gguf  # noqa: PLC0415

    if not twin.exists():
        return "none"
    g = read_gguf(twin)
    counts = {k: v for k, v in g.type_counts().items() if k != "F32"}
    g.close()
    return max(counts, key=lambda k: counts[k]) if counts else "F32"


def bench_2b(work: Path, smoke: bool, row: Callable[..., dict[str, Any]]) -> list[dict[str, Any]]:
    """The S rows (`row` is bench.py's row constructor)."""
    if smoke:
        return [row("S", "2B-4T rows skipped (--smoke)", "-", None)]
    store = Path(os.environ.get("PARITY_BOTH_CACHE", Path.home() / ".cache/parity-both")) / BENCH_STORE
    jobs: dict[str, dict[str, Any]] = {}
    i2s, tq2 = _fixtures(store, jobs)
    if not (i2s.exists() and tq2.exists()):
        return [row("S0", "could not build the 2b4t fixture", "-", False)]
    w = work / "2b4t"
    w.mkdir(parents=True, exist_ok=True)
    rows = _resource_rows(i2s, tq2, w, jobs, row)
    shutil.rmtree(w, ignore_errors=True)  # before the whole run: its twin and caches need the disk
    from bench_2b_run import rows as run_rows  # noqa: PLC0415 - bench/ is on sys.path (script directory)
    from bench_2b_run import whole_run  # noqa: PLC0415

    rows.extend(run_rows(whole_run(i2s, work / "2b4t-run"), row))
    shutil.rmtree(work / "2b4t-run", ignore_errors=True)
    return rows


def _best(jobs: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    """The faster of runs name_1 and name_2 (with the higher peak RSS of the two; rc: the worse)."""
    runs = [jobs[f"{name}_{k}"] for k in (1, 2)]
    return {
        "wall_s": min(r["wall_s"] for r in runs),
        "vmhwm_mb": max(r["vmhwm_mb"] for r in runs),
        "rc": max(r["rc"] for r in runs),
    }


def _resource_rows(
    i2s: Path, tq2: Path, w: Path, jobs: dict[str, dict[str, Any]], row: Callable[..., dict[str, Any]]
) -> list[dict[str, Any]]:
    """S1-S3 (and S0: the wall and peak RSS of each job they ran)."""
    prep, twin = w / "prepared", w / "twin-auto.gguf"
    jobs["prepare"] = job("prepare", w, ["-c", PREP_CODE, str(i2s), str(prep)])
    jobs["twin"] = job("twin", w, ["-m", "parity_both.gguf.twin", "--dtype", "auto", str(i2s), str(twin)])
    # S2: the better of two runs each (page cache warm for both: the first run may read the files from disk),
    # after the prepare and twin jobs' ~6 GB of writes are flushed (their write-back slowed a timed run by ~1.5 s)
    os.sync()
    for k in (1, 2):
        jobs[f"reference_{k}"] = job(f"reference_{k}", w, ["-c", REF_CODE, str(i2s), str(prep)])
        jobs[f"llama_lane_{k}"] = job(f"llama_lane_{k}", w, ["-c", LANE_CODE, str(tq2)])
    size = i2s.stat().st_size
    ref, lane = (_best(jobs, name) for name in ("reference", "llama_lane"))
    twin_bytes = twin.stat().st_size if twin.exists() else 0
    disk = _du(prep) + twin_bytes
    per_job = ", ".join(f"{k} {v['wall_s']:.0f} s / {v['vmhwm_mb']:.0f} MB" for k, v in jobs.items())
    return [
        row(
            "S1",
            f"2b4t I2_S {size / 2**20:.0f} MB: reference peak RSS {ref['vmhwm_mb']:.0f} MB",
            f"<= {(size + GB) / 2**20:.0f} MB",
            ref["rc"] == 0 and ref["vmhwm_mb"] * 2**20 <= size + GB,
        ),
        row(
            "S2",
            f"reference {ref['wall_s']:.1f} s vs llama lane (transcoded TQ2_0) {lane['wall_s']:.1f} s "
            f"({ref['wall_s'] / lane['wall_s']:.1f}x), {N_PROMPT} + {N_GEN} tokens",
            "<= 3.0x",
            ref["rc"] == 0 and lane["rc"] == 0 and ref["wall_s"] <= 3 * lane["wall_s"],
        ),
        row(
            "S3",
            f"prepared {_du(prep) / GB:.2f} GB ({jobs['prepare']['wall_s']:.0f} s) + twin {_twin_dtype(twin)} "
            f"{twin_bytes / GB:.2f} GB ({jobs['twin']['wall_s']:.0f} s) = {disk / size:.1f}x the file",
            "<= 6.0x",
            jobs["prepare"]["rc"] == 0 and jobs["twin"]["rc"] == 0 and disk <= 6 * size,
        ),
        row("S0", f"jobs of S1-S3 (wall / peak RSS): {per_job}", "report", None),
    ]
