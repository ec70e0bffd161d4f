"""The llama forward graph (llama.cpp's build_llama), in plain NumPy.

    x = token_embd[ids]
    for each layer:
        h = rms_norm(x) * attn_norm
        q, k, v = Wq h (+bq), Wk h (+bk), Wv h (+bv)        -> heads of head_dim
        q, k = rope(q), rope(k)                              "normal": adjacent pairs (2i, 2i+1)
        a = softmax(q k^T / sqrt(hd) + causal mask) v        GQA: q head h reads kv head h // (H/Hkv)
        x = x + Wo a (+bo)
        h = rms_norm(x) * ffn_norm
        x = x + Wd (silu(Wg h (+bg)) * (Wu h (+bu))) (+bd)
                or, with experts (expert_count > 0, Mixtral):  x = x + moe_ffn(h)    (blocks.moe_ffn)
    logits = W_out (rms_norm(x) * output_norm)               W_out = output.weight or token_embd

Traced nodes carry the names llama.cpp's October-2024 build_llama gives them, in its evaluation
order (see trace.py). A fused attn_qkv (legacy GGUFs; current llama.cpp's build_qkv) is traced as
Qcur/Kcur/Vcur after the split.
"""

from __future__ import annotations

import numpy as np

from parity_both.reference import ops
from parity_both.reference.blocks import linear, moe_ffn
from parity_both.reference.hparams import HParams
from parity_both.reference.kv_cache import KVCache
from parity_both.reference.ops import Emit, Trace
from parity_both.reference.weights import WeightStore


def _fused_qkv(hp: HParams, w: WeightStore, p: str, h: np.ndarray) -> tuple[np.ndarray, ...]:
    """One attn_qkv matmul split as [q | k | v] (+ its bias, or separate q/k/v biases)."""
    nq, nk = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    y = w.linear(p + "attn_qkv", h)
    if w.has(p + "attn_qkv.bias"):
        y = y + w.vector(p + "attn_qkv.bias")
    q, k, v = y[:, :nq], y[:, nq : nq + nk], y[:, nq + nk :]
    if not w.has(p + "attn_qkv.bias"):  # fused weight with separate biases (legacy GGUFs)
        q, k, v = (
            a + w.vector(p + f"attn_{n}.bias") if w.has(p + f"attn_{n}.bias") else a
            for a, n in ((q, "q"), (k, "k"), (v, "v"))
        )
    return q, k, v


def forward(hp: HParams, w: WeightStore, ids: np.ndarray, kv: KVCache, trace: Emit | None = None) -> np.ndarray:
    """Logits [len(ids), n_vocab] for ids at positions kv.n ..; their K/V are added to the cache."""
    t, rp, eps = Trace(trace), hp.rope, hp.rms_eps
    T, n_past, H, Hkv, hd = len(ids), kv.n, hp.n_head, hp.n_head_kv, hp.head_dim
    factors = w.vector("rope_freqs.weight") if rp.freq_factors else None
    cos, sin = ops.rope_cos_sin(
        np.arange(n_past, n_past + T), rp.n_rot, rp.freq_base, rp.freq_scale, factors, rp.attn_factor
    )

    x = t("inp_embd", -1, "GET_ROWS", w.rows_of("token_embd.weight", ids))
    w.release("token_embd.weight")
    for il in range(hp.n_layer):
        p = f"blk.{il}."
        h = ops.norm(t, il, "attn_norm", x, w.vector(p + "attn_norm.weight"), eps)
        fused = _fused_qkv(hp, w, p, h) if w.has(p + "attn_qkv.weight") else None
        q = fused[0] if fused else linear(w, t, il, p + "attn_q", h, "Qcur")
        q = t("Qcur", il, "ROPE", ops.rope(q.reshape(T, H, hd), cos, sin, neox=False))
        k = fused[1] if fused else linear(w, t, il, p + "attn_k", h, "Kcur")
        k = t("Kcur", il, "ROPE", ops.rope(k.reshape(T, Hkv, hd), cos, sin, neox=False))
        v = fused[2] if fused else linear(w, t, il, p + "attn_v", h, "Vcur")
        ks, vs = kv.append(il, k, v.reshape(T, Hkv, hd))
        a = ops.attention(q, ks, vs, n_past, hp.kq_scale, t, il)
        x = t("ffn_inp", il, "ADD", x + linear(w, t, il, p + "attn_output", a, "kqv_out", node_with_bias="kqv_wo"))

        h = ops.norm(t, il, "ffn_norm", x, w.vector(p + "ffn_norm.weight"), eps)
        if hp.moe is not None:  # Mixtral layout: router + stacked experts (blocks.moe_ffn)
            x = t("l_out", il, "ADD", x + moe_ffn(hp, w, t, il, h))
            continue
        gate = linear(w, t, il, p + "ffn_gate", h, "ffn_gate", bias_node="ffn_gate_b")
        act = t("ffn_silu", il, "SILU", ops.silu(gate))
        up = linear(w, t, il, p + "ffn_up", h, "ffn_up", bias_node="ffn_up_b")
        par = t("ffn_gate_par", il, "MUL", act * up)
        x = t("l_out", il, "ADD", x + linear(w, t, il, p + "ffn_down", par, "ffn_out", node_with_bias="ffn_down"))
    kv.advance(T)

    x = ops.norm(t, -1, "result_norm", x, w.vector("output_norm.weight"), eps)
    return t("result_output", -1, "MUL_MAT", w.linear("output" if w.has("output.weight") else "token_embd", x))
