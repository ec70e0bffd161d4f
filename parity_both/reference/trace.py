"""The reference's intermediates under llama.cpp's graph node names, in the lanes' capture format.

Every forward graph takes an optional callback ``trace(name, op, array)`` (ops.Emit), called once per
node it computes, in llama.cpp's evaluation order, with llama.cpp's name (`attn_norm-3`,
`result_output`, ...) and ggml op (ggml_op_desc: "MUL_MAT", "RMS_NORM", "SILU", ...). Arrays are in
llama.cpp's layout: numpy shape = reversed ggml ne (attn_norm-i: ne [n_embd, n_tokens] -> (n_tokens,
n_embd)). Without a callback nothing is recorded and nothing extra is computed.

Names follow the October-2024 tree (llama-cpp-python 0.3.1's vendor/llama.cpp/src/llama.cpp:
build_llama, build_bitnet, llm_build_norm, llm_build_ffn, llm_build_kqv, llm_build_kv). Per layer i:

    llama   norm-i attn_norm-i Qcur-i[MUL_MAT] (Qcur-i[ADD] with bias) Qcur-i[ROPE] Kcur-i... Kcur-i[ROPE]
            Vcur-i... kq-i kq_soft_max_ext-i kqv-i kqv_merged-i kqv_merged_cont-i (kqv_wo-i) kqv_out-i
            ffn_inp-i norm-i ffn_norm-i ffn_gate-i (ffn_gate_b-i) ffn_silu-i ffn_up-i (ffn_up_b-i)
            ffn_gate_par-i (ffn_down-i) ffn_out-i l_out-i
    bitnet  norm-i attn_norm-i Qcur-i Qcur-i[ROPE] Kcur-i Kcur-i[ROPE] Vcur-i kq-i kq_soft_max_ext-i kqv-i
            kqv_merged-i kqv_out-i[CONT] norm-i attn_sub_norm-i attn_o_out-i ffn_inp-i norm-i ffn_norm-i
            ffn_gate-i (ffn_gate_s-i) ffn_silu-i | ffn_relu-i ffn_sqr(relu)-i, ffn_up-i (ffn_up_s-i)
            ffn_sub_out-i norm-i ffn_sub_norm-i ffn_down-i l_out-i
    then    norm result_norm result_output

Not emitted: llama.cpp's views of its KV cache (k-i, v-i, k_cache_view-i, ...), the copies into it,
reshapes/permutes of Q (q-i), unnamed nodes (a bitnet matmul before its scale). kq-i and
kq_soft_max_ext-i cover the S = n_past + n_tokens positions; llama.cpp's span n_kv >= S cells (padded,
masked): compare the first S.

Current llama.cpp (llama-cpp-python 0.3.36: src/models/*.cpp, llama-graph.cpp) renamed and reordered
some nodes; `to_current` (reference_capture(generation="current")) rewrites a trace into its names,
checked node for node against its cb_eval sequence in tests/test_reference_trace.py.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from parity_both.capture import SCHEMA
from parity_both.reference.blas import fix_blas_threads
from parity_both.reference.engine import load_model

ENGINE = "parity-both numpy reference"


Record = tuple[str, str, np.ndarray]  # (name, op, float32 data)
GENERATIONS = ("2024-10", "current")
_LAYER = re.compile(r"^(.*)-(\d+)$")


class Recorder:
    """A trace callback keeping every node (a float32 copy of its data), in order."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def __call__(self, name: str, op: str, a: np.ndarray) -> None:
        self.records.append((name, op, np.array(a, dtype=np.float32)))

    @property
    def nodes(self) -> list[dict[str, Any]]:
        return capture_nodes(self.records)[0]

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        return capture_nodes(self.records)[1]


def capture_nodes(records: list[Record]) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """The capture index's node records (ne = reversed numpy shape, padded to 4) and the data by key."""
    nodes, arrays = [], {}
    for i, (name, op, data) in enumerate(records):
        key = f"n{i:04d}"
        ne = [int(n) for n in reversed(data.shape)] + [1] * (4 - data.ndim)
        nodes.append({"i": i, "key": key, "name": name, "op": op, "ne": ne, "type": "f32", "op_params": [], "src": []})
        arrays[key] = data
    return nodes, arrays


def _split(name: str) -> tuple[str, str]:
    m = _LAYER.match(name)
    return (m.group(1), m.group(2)) if m else (name, "")


# architectures whose Q is scaled after RoPE: llama.cpp evaluates their K chain before V
_K_BEFORE_V = ("gemma2", "gemma3")  # (phi3 too, but its fused V is a view: evaluated early)
_QKV = ("Qcur", "Kcur", "Vcur")


def _qkv_current(block: list[Record], heads: dict[str, tuple[int, ...]], k_first: bool) -> list[Record]:
    """Current build_qkv/build_attn: each of Q/K/V also named on its reshape to heads; then its head
    norm (qwen3/gemma3: norm, Qcur_normed), RoPE and scale; chains in llama.cpp's evaluation order
    Q, V, K (Q, K, V when Q is scaled after RoPE)."""
    by: dict[str, list[Record]] = {b: [] for b in _QKV}
    normed: dict[str, list[Record]] = {b: [] for b in _QKV}
    pending: Record | None = None
    for r in block:
        base = _split(r[0])[0]
        if base == "norm":
            pending = r
        elif base.endswith("_normed"):
            normed[base[:4]] += ([pending] if pending else []) + [r]
            pending = None
        else:
            by[base].append(r)
    out: list[Record] = []
    for b in ("Qcur", "Kcur", "Vcur") if k_first else ("Qcur", "Vcur", "Kcur"):
        pre = [r for r in by[b] if r[1] not in ("ROPE", "SCALE")]  # none for a fused attn_qkv
        shape = heads.get(b)
        viewed = pre and pre[-1][1] == "VIEW"  # fused attn_qkv: already viewed as heads
        reshaped = [(pre[-1][0], "RESHAPE", pre[-1][2].reshape(shape))] if pre and shape and not viewed else []
        out += pre + reshaped + normed[b] + [r for r in by[b] if r[1] == "ROPE"] + [r for r in by[b] if r[1] == "SCALE"]
    return out


def _in_qkv_block(name: str, open_block: bool) -> bool:
    base = _split(name)[0]
    return base in _QKV or (open_block and (base == "norm" or base.endswith("cur_normed")))


def _head_shapes(records: list[Record]) -> dict[str, dict[str, tuple[int, ...]]]:
    """Layer -> {Qcur/Kcur/Vcur: heads shape}, from the RoPE records (V has K's heads)."""
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, op, a in records:
        base, il = _split(name)
        if op == "ROPE" and base in ("Qcur", "Kcur"):
            shapes.setdefault(il, {})[base] = a.shape
            if base == "Kcur":
                shapes[il]["Vcur"] = a.shape
    return shapes


_GLU_ACT = {"ffn_silu": ("ffn", "silu"), "ffn_gelu": ("ffn", "gelu"), "ffn_moe_silu": ("ffn_moe", "silu")}
_PAR_OF = {"ffn_gate_par": "ffn", "ffn_sub_out": "ffn", "ffn_moe_gate_par": "ffn_moe"}
_RENAMED = {"inp_embd": "embd", "kq_soft_max_ext": "kq_soft_max", "attn_o_out": "attn_out"}


def to_current(records: list[Record], arch: str | None = None) -> list[Record]:
    """Rename a trace (October-2024 names) as current llama.cpp (llama-cpp-python 0.3.36) names its
    nodes, measured with cb_eval: embd; Qcur/Kcur/Vcur also on the reshape, expanded Q, V, K;
    kq_soft_max; kqv-i (permuted); llama's kqv_merged_cont -> kqv_out and its projection -> attn_out
    (the pre-bias matmul kqv_wo unnamed); bitnet's attn_o_out -> attn_out; SiLU and the gate product
    fused into one SWIGLU node (ffn_swiglu; bitnet keeps naming it ffn_sub_out)."""
    out: list[Record] = []
    block: list[Record] = []
    heads = _head_shapes(records)
    glu: dict[tuple[str, str], str] = {}  # (layer, ffn|ffn_moe) -> silu|gelu: fused with the product
    for k, (name, op, a) in enumerate(records):
        base, il = _split(name)
        if _in_qkv_block(name, bool(block)):
            block.append((name, op, a))
            if k + 1 == len(records) or not _in_qkv_block(records[k + 1][0], True):
                out += _qkv_current(block, heads.get(il, {}), arch in _K_BEFORE_V)
                block = []
        elif base in _GLU_ACT:
            glu[(il, _GLU_ACT[base][0])] = _GLU_ACT[base][1]
        elif base in ("ffn_gate_par", "ffn_sub_out", "ffn_moe_gate_par") and (il, _PAR_OF[base]) in glu:
            kind = glu[(il, _PAR_OF[base])]
            fused = f"{_PAR_OF[base]}_{'swiglu' if kind == 'silu' else 'geglu'}-{il}"
            out.append((name if base == "ffn_sub_out" else fused, "SWIGLU" if kind == "silu" else "GEGLU", a))
        elif base == "kqv_merged":
            out.append((f"kqv-{il} (permuted)", op, a))
        elif base == "kqv_merged_cont":
            out.append((f"kqv_out-{il}", op, a))
        elif base == "kqv_out" and op != "CONT":
            out.append((f"attn_out-{il}", op, a))
        elif base != "kqv_wo":
            out.append((_RENAMED.get(base, base) + (f"-{il}" if il else ""), op, a))
    return out


def reference_capture(
    gguf_path: str | os.PathLike[str],
    ids: list[int],
    mode: str = "exact",
    activation: str | None = None,
    generation: str = "2024-10",
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Evaluate `ids` in one batch (positions 0..n-1, as a lane's capture does) and return the
    capture index (the JSON document of the lanes' format; the reference records no sources or
    op_params) and the node arrays by key. generation: whose node names, "2024-10" (the October-2024
    tree, BitNet.cpp's era) or "current" (llama-cpp-python 0.3.36's llama.cpp, see to_current)."""
    if generation not in GENERATIONS:
        raise ValueError(f"unknown llama.cpp generation {generation!r} (expected one of {GENERATIONS})")
    fix_blas_threads()
    model = load_model(gguf_path, activation=activation, mode=mode)
    rec = Recorder()
    try:
        model.forward(np.asarray([int(i) for i in ids], dtype=np.int64), model.new_cache(len(ids)), rec)
    finally:
        model.close()
    hp = model.hp
    nodes, arrays = capture_nodes(rec.records if generation == "2024-10" else to_current(rec.records, hp.arch))
    index = {
        "schema": SCHEMA,
        "engine": ENGINE,
        "n_tokens": len(ids),
        "arch": hp.arch,
        "mode": mode,
        "activation": hp.activation,
        "names": generation,
        "nodes": nodes,
    }
    return index, arrays
