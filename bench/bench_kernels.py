"""Benchmark: the op-by-op kernel check vs the reference forward it must stay within ~3x of (issue 11).

One lane capture of the embedded model (llama-cpp-python's cb_eval, the 32-token prompt of
tests/test_kernels.py), then, alternating `--repeats` times in this process: the reference forward over the
same ids (exact and ggml mode, no generation) and the whole kernel check of the capture. CPU seconds
(process_time: the machine is shared) and wall seconds; medians; ratio kernels / reference.

    python bench/bench_kernels.py [--repeats 3] [--capture PREFIX]

Prints JSON and writes bench/out/bench_kernels.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from parity_both.capture import load_capture  # noqa: E402
from parity_both.compare.kernels import check_kernels  # noqa: E402
from parity_both.config import embedded_model_path  # noqa: E402
from parity_both.reference.engine import run_reference  # noqa: E402

TEXT = (
    "<|im_start|>system\nYou are a concise assistant.<|im_end|>\n<|im_start|>user\nName three primary "
    "colours.<|im_end|>\n<|im_start|>assistant\nWhat is the capital of France?"
)


def _timed(fn: Any) -> tuple[float, float, Any]:
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    return time.process_time() - c, time.perf_counter() - w, out


def _capture(model: str, prefix: Path) -> None:
    from parity_both.lanes.llama_cpp_python import LlamaCppPythonLane  # noqa: PLC0415

    lane = LlamaCppPythonLane(model, n_ctx=64, threads=2)
    try:
        lane.eval_capture(lane.tokenize(TEXT, True), prefix)
    finally:
        lane.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--capture", help="an existing capture prefix of the embedded model")
    args = ap.parse_args(argv)
    model = embedded_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(args.capture) if args.capture else Path(tmp) / "capture"
        if not args.capture:
            _capture(model, prefix)
        ids = [int(x) for x in load_capture(prefix).source("l0000").reshape(-1)]
        runs: dict[str, list[tuple[float, float]]] = {"reference_exact": [], "reference_ggml": [], "kernels": []}
        status = None
        for _ in range(args.repeats):
            for mode in ("exact", "ggml"):
                c, w, _ = _timed(lambda m=mode: run_reference(model, ids, 0, mode=m))
                runs[f"reference_{mode}"].append((c, w))
            c, w, sec = _timed(lambda: check_kernels(prefix, model))
            runs["kernels"].append((c, w))
            status = sec["status"]
    med = {
        k: {
            "cpu_s": round(statistics.median(x[0] for x in v), 3),
            "wall_s": round(statistics.median(x[1] for x in v), 3),
        }
        for k, v in runs.items()
    }
    out = {
        "n_tokens": len(ids),
        "repeats": args.repeats,
        "kernels_status": status,
        "median": med,
        "ratio_cpu": {m: round(med["kernels"]["cpu_s"] / med[f"reference_{m}"]["cpu_s"], 2) for m in ("exact", "ggml")},
    }
    (ROOT / "bench" / "out").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "out" / "bench_kernels.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(json.dumps(out, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
