"""Cluster-ready resources of every rule (rules/*.smk declare `resources: **RES[rule]`).

Memory grows with the size of the job's inputs (the model file dominates: a GGUF, its F32 twin, or logits over
its vocabulary), evaluated by Snakemake once the inputs exist; `runtime` is a generous wall-clock limit in
minutes (SLURM --time). A retried job (attempt 2, profiles/slurm `retries`) asks for twice the memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def mem_mb(base: float, per_input_mb: float) -> Callable[..., int]:
    def _mem_mb(wildcards: Any, input: Any, attempt: int) -> int:  # noqa: A002 - Snakemake's argument name
        return int((base + per_input_mb * input.size_mb) * attempt)

    return _mem_mb


# rule: (base MB, MB per MB of input, runtime minutes)
TABLE: dict[str, tuple[float, float, int]] = {
    "backend": (2000, 0, 60),  # compiles a llama.cpp tree (2 compiler processes)
    "model_facts": (500, 0.1, 5),
    "fixture": (1000, 0, 10),
    "transcode": (500, 3, 10),
    "twin": (1000, 3, 20),  # dequantizes tensor by tensor into an F32 file
    "tokenizer_authority": (1000, 1, 10),
    "format_prompt": (1000, 0.2, 10),
    "prepare_reference": (1000, 8, 20),  # an F32 copy of every weight (~7x a 4-bit file)
    "reference": (1500, 2, 60),  # memory-maps the prepared weights; logits of every position
    "twin_reference": (1500, 2, 60),
    "lane_vocab": (500, 1, 10),
    "lane_eval": (1000, 2, 30),  # the engine maps the model; logits of every position
    "twin_lane_eval": (1000, 2, 30),
    "receipt": (1000, 3, 15),  # both sides' logits in float64
    "summary": (500, 1, 5),
    "plot_receipt": (800, 2, 5),
    "report_table": (300, 1, 5),
    "kl_base": (1000, 2, 10),
    # rules on main not yet in this branch (issue 13 captures): their rules need `resources: **RES[name]`
    "localize": (1500, 3, 30),  # both captures of every graph node
    "kernels": (2000, 3, 60),  # recomputes every captured node
}

RES: dict[str, dict[str, Any]] = {
    name: {"mem_mb": mem_mb(base, per), "runtime": minutes} for name, (base, per, minutes) in TABLE.items()
}
