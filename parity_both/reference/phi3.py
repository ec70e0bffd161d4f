"""The phi3 forward graph (llama.cpp's src/models/phi3.cpp), in plain NumPy.

Differences from llama (llama.py):
    QKV         one fused attn_qkv matmul, split [q | k | v] (separate attn_q/k/v accepted too)
    FFN         one fused ffn_up [2 n_ff] matmul, then SwiGLU on its halves: silu(first) * second
                (no ffn_gate tensor)
    RoPE        NEOX (i pairs with i + n_rot/2); rope.dimension_count may be smaller than the head
    attention   Q scaled by 1/sqrt(hd) before K.Q (softmax scale 1); attention.sliding_window is
                ignored, as llama.cpp ignores it for phi3 (hparams_families.py)
    LM head     output.weight (+ output.bias when present), else token_embd

    x = token_embd[ids]
    for each layer:
        h = rms_norm(x) * attn_norm
        q, k, v = split(Wqkv h)
        q, k = rope_neox(q) / sqrt(hd), rope_neox(k)
        x = x + Wo softmax(q k^T + causal mask) v
        u = Wup (rms_norm(x) * ffn_norm)
        x = x + Wd (silu(u[:n_ff]) * u[n_ff:])
    logits = W_out (rms_norm(x) * output_norm) (+ output.bias)
"""

from __future__ import annotations

import numpy as np

from parity_both.reference import ops
from parity_both.reference.blocks import LayerRope, linear, output_logits, qkv
from parity_both.reference.hparams import HParams
from parity_both.reference.kv_cache import KVCache
from parity_both.reference.ops import Emit, Trace
from parity_both.reference.weights import WeightStore

F32 = np.float32


def forward(hp: HParams, w: WeightStore, ids: np.ndarray, kv: KVCache, trace: Emit | None = None) -> np.ndarray:
    """Logits [len(ids), n_vocab] for ids at positions kv.n ..; their K/V are added to the cache."""
    t, eps, T, n_past, n_ff = Trace(trace), hp.rms_eps, len(ids), kv.n, hp.n_ff
    rope = LayerRope(hp, w, n_past, T)
    x = t("inp_embd", -1, "GET_ROWS", w.rows_of("token_embd.weight", ids))
    w.release("token_embd.weight")
    for il in range(hp.n_layer):
        p = f"blk.{il}."
        h = ops.norm(t, il, "attn_norm", x, w.vector(p + "attn_norm.weight"), eps)
        q, k, v = qkv(hp, w, t, il, h)
        q = t("Qcur", il, "ROPE", rope(il, q))
        k = t("Kcur", il, "ROPE", rope(il, k))
        q = t("Qcur", il, "SCALE", q * F32(hp.kq_scale))
        ks, vs = kv.append(il, k, v)
        a = ops.attention(q, ks, vs, n_past, 1.0, t, il, window=rope.window(il))  # no window unless hp.swa
        x = t("ffn_inp", il, "ADD", x + linear(w, t, il, p + "attn_output", a, "kqv_out", node_with_bias="kqv_wo"))

        h = ops.norm(t, il, "ffn_norm", x, w.vector(p + "ffn_norm.weight"), eps)
        up = t("ffn_up", il, "MUL_MAT", w.linear(p + "ffn_up", h))
        sw = t("ffn_swiglu", il, "SWIGLU", ops.silu(up[:, :n_ff]) * up[:, n_ff:])
        x = t("l_out", il, "ADD", x + t("ffn_out", il, "MUL_MAT", w.linear(p + "ffn_down", sw)))
    kv.advance(T)

    x = ops.norm(t, -1, "result_norm", x, w.vector("output_norm.weight"), eps)
    return output_logits(w, t, x)
