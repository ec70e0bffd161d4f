"""Per-op NMSE floors of the kernel check: above its floor, a node is not what an honest ggml kernel computes
from the same inputs.

Keyed by op; for MUL_MAT and GET_ROWS by the weight's GGUF type (``MUL_MAT:Q4_1``), and for matmuls between
activations by the type of src0 (``MUL_MAT:act-f32``, ``MUL_MAT:act-f16`` for an F16 V cache).

How measured (see HONEST_WORST): captures of honest lanes on the embedded SmolLM2-135M Q4_1 model (32
positions) - llama-cpp-python 0.3.36 (``llama``) and the October-2024 tree through the harness
(``llama-2024``, F16 V cache) - and the bitnet TQ2_0/TQ1_0 fixtures and a llama Q4_0 fixture through
llama-cpp-python. Each floor is at least MARGIN x the worst honest NMSE for its key, rounded up to a
power of ten, and never below MIN_FLOOR (ops that are bit-exact on every honest lane).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

MARGIN = 10.0
MIN_FLOOR = 1e-12
# A key no honest lane has been measured on (other K-quant / IQ types, GELU, ...): the emulation is exact
# up to float32 rounding for every weight type it reads (~1e-7 relative -> NMSE ~1e-14), so 1e-8 still
# leaves a wide margin while a kernel bug (NMSE 1e-4 .. 1) stays far above it.
DEFAULT_FLOOR = 1e-8

# Worst honest NMSE per key, max over the lanes above (measured 2026-11-30: llama-cpp-python 0.3.36 and the
# Oct-2024 harness on SmolLM2 Q4_1, 32 positions, 2 threads; bitnet TQ2_0/TQ1_0 and llama Q4_0 "small"
# fixtures through llama-cpp-python, the TQ2_0 fixture through the Oct-2024 harness). 0.0 = bit-exact.
HONEST_WORST: dict[str, float] = {
    "MUL_MAT:Q4_1": 5.0e-13,  # float32 accumulation order of the Q8_1 x Q4_1 dot products (K <= 1536)
    "MUL_MAT:Q4_0": 8.8e-15,
    "MUL_MAT:Q8_0": 2.2e-14,  # the LM head (tied token_embd)
    "MUL_MAT:TQ1_0": 3.0e-14,
    "MUL_MAT:TQ2_0": 3.7e-14,  # Oct-2024 tree: with its FMA-contracted Q8_K rounding (see recompute)
    "MUL_MAT:F16": 2.1e-14,  # F16 LM head of the bitnet fixtures
    "MUL_MAT:act-f32": 1.4e-14,  # kq / kqv with an F32 cache
    "MUL_MAT:act-f16": 3.7e-15,  # kqv with the Oct-2024 tree's F16 V cache (tinyBLAS path)
    "ROPE": 1.8e-15,  # cosf/sinf and powf vs the reference's correctly rounded tables
    "SOFT_MAX": 5.4e-15,
    "SILU": 3.7e-15,
    "SWIGLU": 4.3e-15,
    "ADD": 0.0,
    "MUL": 0.0,
    "RMS_NORM": 0.0,
    "GET_ROWS": 0.0,
    "GET_ROWS:Q8_0": 0.0,
    "GET_ROWS:Q4_0": 0.0,
    "GET_ROWS:F16": 0.0,
    "CPY": 0.0,
    "SET_ROWS": 0.0,
    "VIEW": 0.0,
    "RESHAPE": 0.0,
    "PERMUTE": 0.0,
    "TRANSPOSE": 0.0,
    "CONT": 0.0,
}


# What it catches (measured 2026-11-30): the mutation suite's one-line patches to the October-2024 tree
# (tests/mutants), run as harness lanes on SmolLM2 Q4_1 (tq2_0-sign-flip: the bitnet TQ2_0 fixture), 32
# positions. mutant -> (first failing node, its key, NMSE there, smallest NMSE over the failing nodes of
# that key, parameter/wiring record). Every planted bug fails at its first node in evaluation order.
PLANTED: dict[str, tuple[str, str, float, float, str | None]] = {
    "q4_1-min-scaled": ("Qcur-0", "MUL_MAT:Q4_1", 3.6e-2, 3.6e-2, None),
    "q4_1-scale-wrong-block": ("Qcur-0", "MUL_MAT:Q4_1", 8.5e-2, 8.3e-2, None),
    "q8_0-dequant-wrong-block": ("inp_embd", "GET_ROWS:Q8_0", 0.45, 0.45, None),
    "tq2_0-sign-flip": ("Qcur-0", "MUL_MAT:TQ2_0", 4.0, 4.0, None),
    "rope-base": ("Qcur-0", "ROPE", 6.6e-3, 9.1e-4, "freq_base 150000 vs 100000"),
    "kq-scale": ("kq_soft_max_ext-0", "SOFT_MAX", 8.1e-5, 2.8e-5, "scale 0.1230915 vs 0.125"),
    "rms-eps": ("norm-0", "RMS_NORM", 0.42, 5.3e-9, "eps 0.1 vs 1e-5"),
    "causal-mask": ("kq_soft_max_ext-0", "SOFT_MAX", 0.23, 1.8e-2, None),
    "silu-gelu": ("ffn_silu-0", "GELU", 2.0e-2, 2.6e-3, "activation GELU vs SILU"),
    "ffn-gate-up-swap": ("ffn_silu-0", "SILU", 2.2e-15, 7.0e-17, "wiring: reads blk.0.ffn_up"),
    "ffn-no-residual": ("l_out-0", "ADD", 0.0, 0.0, "wiring: adds inp_embd, not ffn_inp-0"),
}


def _floor(worst: float) -> float:
    """MARGIN x worst, rounded up to a power of ten, at least MIN_FLOOR."""
    if worst <= 0:
        return MIN_FLOOR
    return max(MIN_FLOOR, float(f"1e{math.ceil(math.log10(worst * MARGIN))}"))


FLOORS: dict[str, float] = {k: _floor(v) for k, v in HONEST_WORST.items()}


def floor_key(op: str, weight_type: str | None) -> str:
    if op in ("MUL_MAT", "GET_ROWS") and weight_type:
        wt = weight_type.upper()
        return f"{op}:act-{weight_type.lower()}" if weight_type.islower() else f"{op}:{wt}"
    return op


def floor_for(key: str, floors: Mapping[str, float]) -> float:
    if key in floors:
        return floors[key]
    op = key.split(":", 1)[0]
    return floors.get(op, DEFAULT_FLOOR)
