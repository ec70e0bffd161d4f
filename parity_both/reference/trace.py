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
masked): compare the first S. Current llama.cpp (0.3.36 src/models/*.cpp, llama-graph.cpp) renamed
some nodes: kq_soft_max (was kq_soft_max_ext), attn_out (the output projection; llama's kqv_out,
bitnet's attn_o_out), kqv_out (now the merged attention before it: kqv_merged_cont / bitnet kqv_out),
ffn_swiglu (fused silu(gate) * up: ffn_gate_par; bitnet's is named ffn_sub_out), no ffn_silu, and
Qcur/Kcur/Vcur also name the reshape between matmul and RoPE.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from parity_both.reference.blas import fix_blas_threads
from parity_both.reference.engine import load_model

CAPTURE_SCHEMA = "parity-both/capture/1"
ENGINE = "parity-both numpy reference"


class Recorder:
    """A trace callback keeping every node: the capture index's node records and their float32 data."""

    def __init__(self) -> None:
        self.nodes: list[dict[str, Any]] = []
        self.arrays: dict[str, np.ndarray] = {}

    def __call__(self, name: str, op: str, a: np.ndarray) -> None:
        i = len(self.nodes)
        key = f"n{i:04d}"
        data = np.array(a, dtype=np.float32)  # a copy, C-contiguous
        ne = [int(n) for n in reversed(data.shape)] + [1] * (4 - data.ndim)
        self.nodes.append({"i": i, "key": key, "name": name, "op": op, "ne": ne, "type": "f32",
                           "op_params": [], "src": []})
        self.arrays[key] = data


def reference_capture(gguf_path: str | os.PathLike[str], ids: list[int], mode: str = "exact",
                      activation: str | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Evaluate `ids` in one batch (positions 0..n-1, as a lane's capture does) and return the
    capture index (the JSON document of the lanes' format; the reference records no sources or
    op_params) and the node arrays by key."""
    fix_blas_threads()
    model = load_model(gguf_path, activation=activation, mode=mode)
    rec = Recorder()
    try:
        model.forward(np.asarray([int(i) for i in ids], dtype=np.int64), model.new_cache(len(ids)), rec)
    finally:
        model.close()
    hp = model.hp
    index = {"schema": CAPTURE_SCHEMA, "engine": ENGINE, "n_tokens": len(ids), "arch": hp.arch, "mode": mode,
             "activation": hp.activation, "nodes": rec.nodes}
    return index, rec.arrays


def save_capture(index: dict[str, Any], arrays: dict[str, np.ndarray], npz_path: str | os.PathLike[str],
                 json_path: str | os.PathLike[str]) -> None:
    """Write `capture/{prompt}.npz` (arrays by key) and `capture/{prompt}.json` (the index)."""
    Path(npz_path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(npz_path, **arrays)
    Path(json_path).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
