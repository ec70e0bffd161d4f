"""Measure every built mutant through the real pipeline (see MEASUREMENTS.md).

    PYTHONPATH=. python -m tests.mutants.measure WORKDIR [--twin F32.gguf] [--no-run]

Writes WORKDIR/config.yaml (models: the embedded SmolLM2 Q4_1, its F32 twin, the bitnet TQ2_0 fixture;
one raw prompt + 8 generated tokens; lanes: llama-2024, llama and every mutant whose build is in the
cache), runs snakemake on it, then compares each lane's logits with the honest llama-2024 lane's and
with the reference's: WORKDIR/measurements.json and a markdown table on stdout. Mutants not yet built
are left out (their build would start inside the run); build them first with ``mutant_build``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from parity_both.metrics import aggregate, compare_positions
from parity_both.pipeline import load_lane, load_reference
from parity_both.provision.backends import probe_backend

from . import MUTANTS, backend_config, cache_root, lane_name, mutant_spec, mutants_cache
from .twin import f32_twin

REPO = Path(__file__).resolve().parents[2]
PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden press adapted from"
)
MODELS = ("smollm2", "smollm2-f32", "bitnet-tq2")


def config(twin: Path, mutants: list[str]) -> dict[str, Any]:
    return {
        "standalone": True,
        "out_dir": "results",
        "threads": 1,
        "max_tokens": 8,
        "models": {
            "smollm2": {"gguf": "embedded", "tokenizer": None},
            "smollm2-f32": {"gguf": str(twin), "tokenizer": None},
            "bitnet-tq2": {
                "fixture": {"arch": "bitnet", "weight_type": "TQ2_0", "size": "tiny", "seed": 0},
                "activation": "silu",
            },
        },
        "prompts": {"press": {"text": PROMPT, "template": "raw"}},
        "lanes": ["llama-2024", "llama"] + [lane_name(n) for n in mutants],
        "backends": {lane_name(n): backend_config(n) for n in mutants},
    }


def _metrics(base: Any, lane: Any, ids: list[int]) -> dict[str, float]:
    agg = aggregate(compare_positions(base, lane, ids), base, lane)
    return {
        "mean_kl": agg["mean_kl"],
        "max_kl": agg["kl_percentiles"]["max"],
        "nmse": agg["nmse"],
        "same_top1": agg["same_top1"]["rate"],
        "max_abs": agg["max_abs"],
    }


def compare(res: Path, lanes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model in MODELS:
        ref = load_reference(str(res / model / "reference" / "press.npz"))
        honest = load_lane(str(res / model / "lanes" / "llama-2024" / "press.npz"))["logits"]
        out[f"{model}/_positions"], out[f"{model}/_n_prompt"] = len(ref["ids"]), ref["n_prompt"]
        for lane in lanes:
            lg = load_lane(str(res / model / "lanes" / lane / "press.npz"))["logits"]
            receipt = json.loads((res / model / "receipts" / lane / "press.json").read_text())
            out[f"{model}/{lane}"] = {
                "vs_honest": _metrics(honest, lg, ref["ids"]),
                "vs_reference": _metrics(ref["logits"], lg, ref["ids"]),
                "receipt_verdict": receipt.get("status"),
            }
    return out


def table(d: dict[str, Any]) -> str:
    def cell(model: str, lane: str, key: str = "vs_honest") -> str:
        r = d.get(f"{model}/{lane}")
        if not r:
            return "not run"
        m = r[key]
        return f"{m['mean_kl']:.2e} / {m['max_kl']:.2e} / {m['nmse']:.2e} / {m['same_top1']:.3f}"

    rows = [
        "| lane | kind | SmolLM2 Q4_1 | F32 twin | bitnet-tq2 (TQ2_0) | pipeline verdict (Q4_1 / F32 / TQ2_0) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lanes = [("llama-2024", "honest"), ("llama", "honest, 0.3.36")]
    lanes += [(lane_name(n), m.kind) for n, m in MUTANTS.items()]
    for lane, kind in lanes:
        v = " / ".join((d.get(f"{m}/{lane}") or {}).get("receipt_verdict") or "-" for m in MODELS)
        rows.append(f"| `{lane}` | {kind} | {' | '.join(cell(m, lane) for m in MODELS)} | {v} |")
    rows += [
        "",
        "Honest lanes against the exact NumPy reference (same columns):",
        "",
        "| lane | SmolLM2 Q4_1 | F32 twin | bitnet-tq2 (TQ2_0) |",
        "| --- | --- | --- | --- |",
    ]
    for lane in ("llama-2024", "llama"):
        rows.append(f"| `{lane}` | {' | '.join(cell(m, lane, 'vs_reference') for m in MODELS)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--twin", type=Path, default=None, help="an F32 twin of the embedded model (default: cached)")
    ap.add_argument("--no-run", action="store_true", help="only compare the results already in WORKDIR")
    a = ap.parse_args(argv)
    from parity_both.config import embedded_model_path

    twin = a.twin or f32_twin(embedded_model_path(), mutants_cache())
    built = [n for n in MUTANTS if probe_backend(mutant_spec(n), cache_root()).get("present")]
    cfg = config(twin, built)
    a.workdir.mkdir(parents=True, exist_ok=True)
    (a.workdir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=True))
    if not a.no_run:
        cmd = [
            sys.executable,
            "-m",
            "snakemake",
            "--snakefile",
            str(REPO / "Snakefile"),
            "--directory",
            str(a.workdir),
            "--configfile",
            str(a.workdir / "config.yaml"),
            "--profile",
            str(REPO / "profiles" / "default"),
            "--cores",
            "2",
            "results/summary.json",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        (a.workdir / "snakemake.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode not in (0, 1):  # 1: a lane failed its thresholds (expected for mutants)
            print(f"snakemake failed ({proc.returncode}): {a.workdir / 'snakemake.log'}", file=sys.stderr)
            return proc.returncode
    d = compare(a.workdir / "results", cfg["lanes"])
    (a.workdir / "measurements.json").write_text(json.dumps(d, indent=1, sort_keys=True) + "\n")
    print(table(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
