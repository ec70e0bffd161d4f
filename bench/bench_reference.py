"""Benchmark: the NumPy reference as a whole process vs a llama-cpp-python process (issue 6, P1/P2).

Each measured run is a fresh `python` child (startup + imports + load + compute), timed wall-clock,
with its own peak RSS from os.wait4. Lane and reference runs alternate, `--repeats` times; the
medians are compared. Sequence: the prompt + the reference's greedy continuation (the lane
evaluates those same ids in one batch with all-position logits, F32 KV cache, no flash attention).

    python bench/bench_reference.py [--model PATH] [--max-tokens 16] [--repeats 5]

Prints a table and writes bench/out/bench_reference.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# "<|im_start|>user\nWhat is the capital of France? Answer in one word.<|im_end|>\n<|im_start|>assistant\n"
DEFAULT_PROMPT = [
    1,
    4093,
    198,
    1780,
    314,
    260,
    3575,
    282,
    4649,
    47,
    19842,
    281,
    582,
    1932,
    30,
    2,
    198,
    1,
    520,
    9531,
    198,
]

REF_CHILD = """
import json, sys, numpy as np
from parity_both.reference import run_reference
a = json.loads(sys.argv[1])
r = run_reference(a["model"], a["prompt"], a["max_tokens"], prepared_dir=a["prepared_dir"])
np.save(a["out"], r.logits)
json.dump({"ids": r.ids, "timings": r.timings, "settings": r.settings}, open(a["out"] + ".json", "w"))
"""

LANE_CHILD = """
import json, sys, numpy as np
import llama_cpp
import llama_cpp.llama_cpp as lc
a = json.loads(sys.argv[1])
if not a["extra_bufts"]:  # AMX-capable CPUs: llama-cpp-python 0.3.36's AMX matmul segfaults here
    orig = lc.llama_model_default_params
    def params():
        p = orig(); p.use_extra_bufts = False; return p
    lc.llama_model_default_params = params
ids = a["ids"]
n = max(64, len(ids))
llm = llama_cpp.Llama(a["model"], logits_all=True, n_ctx=n, n_batch=n, n_ubatch=n, n_threads=a["threads"],
                      n_threads_batch=a["threads"], type_k=0, type_v=0, flash_attn=False, verbose=False)
llm.reset()
llm.eval(ids)
np.save(a["out"], np.array(llm.scores[: len(ids)], dtype=np.float32))
"""


def run_child(code: str, args: dict[str, Any], env: dict[str, str]) -> dict[str, float]:
    """Run `python -c code json(args)`; wall seconds and peak RSS (MiB) of that child alone."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", code, json.dumps(args)], env=env)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"child failed with exit code {p.returncode}")
    return {"wall_s": wall, "rss_mib": ru.ru_maxrss / 1024, "cpu_s": ru.ru_utime + ru.ru_stime}


def compare(ref: np.ndarray, lane: np.ndarray) -> dict[str, float]:
    a, b = ref.astype(np.float64), lane.astype(np.float64)
    la = a - a.max(1, keepdims=True)
    la -= np.log(np.exp(la).sum(1, keepdims=True))
    lb = b - b.max(1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(1, keepdims=True))
    kl = (np.exp(la) * (la - lb)).sum(1)
    return {
        "nmse": float(((a - b) ** 2).sum() / (a**2).sum()),
        "max_abs": float(np.abs(a - b).max()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1": f"{int((a.argmax(1) == b.argmax(1)).sum())}/{len(a)}",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    ap.add_argument("--prompt-ids", default=None, help="comma-separated ids (default: a chat prompt)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lane-threads", type=int, default=2)
    ap.add_argument(
        "--ref-blas-threads",
        default=None,
        help="OPENBLAS_NUM_THREADS for the reference (default: unset -> its own default)",
    )
    ap.add_argument("--prepared-dir", default=None, help="default: a fresh temporary directory")
    ap.add_argument("--lane-extra-bufts", action="store_true", help="let llama.cpp use AMX/repacked weights")
    ap.add_argument("--skip-lane", action="store_true", help="reference only (e.g. a bitnet model)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "bench_reference.json"))
    a = ap.parse_args(argv)

    if a.model is None:
        sys.path.insert(0, str(ROOT))
        from parity_both.config import embedded_model_path  # noqa: PLC0415 - the repo may not be installed

        a.model = embedded_model_path()
    prompt = [int(x) for x in a.prompt_ids.split(",")] if a.prompt_ids else DEFAULT_PROMPT
    work = Path(tempfile.mkdtemp(prefix="bench-ref-"))
    try:
        return _bench(a, prompt, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # logits and the default prepared cache (~0.5 GB)


def _bench(a: argparse.Namespace, prompt: list[int], work: Path) -> int:
    result, info = _measure(a, prompt, work)
    _report(a, result, info)
    return 0


def _measure(a: argparse.Namespace, prompt: list[int], work: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Cold and warm reference runs alternating with lane runs; (result, the last reference run's info)."""
    prepared = a.prepared_dir or str(work / "prepared")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    ref_env = dict(env)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        ref_env.pop(var, None)
    if a.ref_blas_threads:
        ref_env["OPENBLAS_NUM_THREADS"] = a.ref_blas_threads
    ref_args = {"model": a.model, "prompt": prompt, "max_tokens": a.max_tokens, "out": str(work / "ref.npy")}

    # cold runs: no prepared cache (ephemeral one per run), then the first run that writes prepared_dir
    cold = run_child(REF_CHILD, {**ref_args, "prepared_dir": None}, ref_env)
    first = run_child(REF_CHILD, {**ref_args, "prepared_dir": prepared}, ref_env)
    info = json.loads(Path(str(work / "ref.npy") + ".json").read_text())
    ids = info["ids"]
    lane_args = {
        "model": a.model,
        "ids": ids,
        "threads": a.lane_threads,
        "extra_bufts": a.lane_extra_bufts,
        "out": str(work / "lane.npy"),
    }
    ref_runs, lane_runs = [], []
    for _ in range(a.repeats):
        if not a.skip_lane:
            lane_runs.append(run_child(LANE_CHILD, lane_args, env))
        ref_runs.append(run_child(REF_CHILD, {**ref_args, "prepared_dir": prepared}, ref_env))
    info = json.loads(Path(str(work / "ref.npy") + ".json").read_text())

    def med(runs: list[dict[str, float]], k: str) -> float:
        return statistics.median(r[k] for r in runs)

    size_mib = Path(a.model).stat().st_size / 2**20
    result: dict[str, Any] = {
        "model": a.model,
        "model_mib": round(size_mib, 1),
        "n_prompt": len(prompt),
        "n_ids": len(ids),
        "generated": ids[len(prompt) :],
        "repeats": a.repeats,
        "reference_warm": {
            "wall_s": med(ref_runs, "wall_s"),
            "rss_mib": max(r["rss_mib"] for r in ref_runs),
            "cpu_s": med(ref_runs, "cpu_s"),
            "last_timings": info["timings"],
        },
        "reference_no_prepared_dir": cold,
        "reference_first_with_prepare": first,
        "reference_blas": info["settings"]["numpy"],
        "p2_rss_limit_mib": {"embedded (400 MiB)": 400.0, "file*1.5+200": round(size_mib * 1.5 + 200, 1)},
    }
    if lane_runs:
        lane_wall = med(lane_runs, "wall_s")
        result["lane"] = {
            "wall_s": lane_wall,
            "rss_mib": max(r["rss_mib"] for r in lane_runs),
            "cpu_s": med(lane_runs, "cpu_s"),
            "threads": a.lane_threads,
            "extra_bufts": a.lane_extra_bufts,
        }
        result["ratio_wall_warm"] = result["reference_warm"]["wall_s"] / lane_wall
        result["ratio_wall_no_prepared_dir"] = cold["wall_s"] / lane_wall
        # CPU seconds: a proxy less sensitive to other jobs on the machine (lane threads spin-wait)
        result["ratio_cpu_warm"] = result["reference_warm"]["cpu_s"] / result["lane"]["cpu_s"]
        result["logits_vs_lane"] = compare(np.load(work / "ref.npy"), np.load(work / "lane.npy"))
    try:
        result["loadavg_after"] = os.getloadavg()
    except OSError:
        pass
    return result, info


def _report(a: argparse.Namespace, result: dict[str, Any], info: dict[str, Any]) -> None:
    """Print the table and write the JSON result."""
    n_gen = result["n_ids"] - result["n_prompt"]
    print(
        f"model {a.model} ({result['model_mib']:.1f} MiB), {result['n_prompt']} prompt + {n_gen} "
        f"generated ids, {a.repeats} repeats (medians)"
    )
    rows = [
        ("reference, prepared cache warm", result["reference_warm"]),
        ("reference, no prepared_dir", result["reference_no_prepared_dir"]),
        ("reference, first run (writes cache)", result["reference_first_with_prepare"]),
    ]
    if "lane" in result:
        rows.insert(0, ("llama-cpp-python lane", result["lane"]))
    for label, r in rows:
        print(f"  {label:38s} wall {r['wall_s']:6.3f} s   peak RSS {r['rss_mib']:7.1f} MiB   cpu {r['cpu_s']:.3f} s")
    if "lane" in result:
        print(
            f"  ratio reference/lane wall: warm {result['ratio_wall_warm']:.2f}x (target <= 3), "
            f"no prepared_dir {result['ratio_wall_no_prepared_dir']:.2f}x; "
            f"cpu warm {result['ratio_cpu_warm']:.2f}x"
        )
        print(f"  logits vs lane: {result['logits_vs_lane']}")
    print(f"  reference timings (last warm run): { {k: round(v, 3) for k, v in info['timings'].items()} }")
    nb = info["settings"]["numpy"]
    print(f"  reference BLAS: {nb.get('blas')}; threads {nb.get('blas_threads')} ({nb.get('blas_threads_source')})")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"  written {a.out}")


if __name__ == "__main__":
    sys.exit(main())
