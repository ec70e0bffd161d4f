"""The BitNet b1.58 forward graph (llama.cpp's build_bitnet), in plain NumPy.

    x = token_embd[ids]
    for each layer:
        h = rms_norm(x) * attn_norm
        q, k, v = (Wq h) sq, (Wk h) sk, (Wv h) sv             s* = optional per-matrix scale tensors
        q, k = rope(q), rope(k)                                 NEOX: pairs (i, i + n_rot/2)
        a = softmax(q k^T / sqrt(hd) + causal mask) v           GQA as in llama
        x = x + (Wo (rms_norm(a) * attn_sub_norm)) so           sub-norm BEFORE the output projection
        h = rms_norm(x) * ffn_norm
        f = act((Wg h) sg) * ((Wu h) su)                        act = silu | relu2 (hparams.py)
        x = x + (Wd (rms_norm(f) * ffn_sub_norm)) sd            sub-norm BEFORE the down projection
    logits = token_embd (rms_norm(x) * output_norm)             the LM head is always token_embd

One epsilon for every norm; no biases, no output.weight, no rope_freqs (HParams refuses them). The
scale tensors ``blk.N.<matrix>.scale`` ({1}, F32) multiply the matmul result (Q, K, V, O, down) and
the up and gate results BEFORE the activation, where mainline and the October-2024 tree apply them.

Traced nodes carry the October-2024 build_bitnet names, in its evaluation order (see trace.py):
a scaled Q/K/V/O/down matmul is unnamed there, its scaled result is `Qcur`/.../`attn_o_out`/`ffn_down`;
the FFN's are `ffn_gate` then `ffn_gate_s` (and `ffn_up`, `ffn_up_s`); silu(gate) * up is `ffn_sub_out`.
relu2 is traced as LLM_FFN_RELU_SQR names it: `ffn_relu`, `ffn_sqr(relu)`.
"""

from __future__ import annotations

import numpy as np

from parity_both.reference import ops
from parity_both.reference.hparams import HParams
from parity_both.reference.kv_cache import KVCache
from parity_both.reference.ops import F32, Emit, Trace
from parity_both.reference.weights import WeightStore


def _scaled(
    w: WeightStore, t: Trace, il: int, tensor: str, x: np.ndarray, node: str, scale_node: str | None = None
) -> np.ndarray:
    """(W x) * s, s the optional {1} scale tensor. The result is `node`; the matmul before the scale
    is unnamed, or `node` too when the scale is named `scale_node` (llm_build_ffn's ffn_*_s)."""
    y = w.linear(tensor, x)
    if not w.has(tensor + ".scale"):
        return t(node, il, "MUL_MAT", y)
    if scale_node:
        return t(scale_node, il, "MUL", t(node, il, "MUL_MAT", y) * w.vector(tensor + ".scale"))
    return t(node, il, "MUL", y * w.vector(tensor + ".scale"))


def _activation(t: Trace, il: int, name: str, gate: np.ndarray) -> np.ndarray:
    if name == "silu":
        return t("ffn_silu", il, "SILU", ops.silu(gate))
    r = t("ffn_relu", il, "RELU", np.maximum(gate, F32(0.0)))
    return t("ffn_sqr(relu)", il, "SQR", r * r)  # relu(x)^2, squared ReLU as BitNet b1.58 was trained


def forward(hp: HParams, w: WeightStore, ids: np.ndarray, kv: KVCache, trace: Emit | None = None) -> np.ndarray:
    """Logits [len(ids), n_vocab] for ids at positions kv.n ..; their K/V are added to the cache."""
    t, rp, eps = Trace(trace), hp.rope, hp.rms_eps
    T, n_past, H, Hkv, hd = len(ids), kv.n, hp.n_head, hp.n_head_kv, hp.head_dim
    cos, sin = ops.rope_cos_sin(
        np.arange(n_past, n_past + T), rp.n_rot, rp.freq_base, rp.freq_scale, None, rp.attn_factor
    )

    x = t("inp_embd", -1, "GET_ROWS", w.rows_of("token_embd.weight", ids))
    w.release("token_embd.weight")
    for il in range(hp.n_layer):
        p = f"blk.{il}."
        h = ops.norm(t, il, "attn_norm", x, w.vector(p + "attn_norm.weight"), eps)
        q = _scaled(w, t, il, p + "attn_q", h, "Qcur").reshape(T, H, hd)
        q = t("Qcur", il, "ROPE", ops.rope(q, cos, sin, neox=True))
        k = _scaled(w, t, il, p + "attn_k", h, "Kcur").reshape(T, Hkv, hd)
        k = t("Kcur", il, "ROPE", ops.rope(k, cos, sin, neox=True))
        v = _scaled(w, t, il, p + "attn_v", h, "Vcur").reshape(T, Hkv, hd)
        ks, vs = kv.append(il, k, v)
        a = ops.attention(q, ks, vs, n_past, hp.kq_scale, t, il, cont_name="kqv_out")
        a = ops.norm(t, il, "attn_sub_norm", a, w.vector(p + "attn_sub_norm.weight"), eps)
        x = t("ffn_inp", il, "ADD", x + _scaled(w, t, il, p + "attn_output", a, "attn_o_out"))

        h = ops.norm(t, il, "ffn_norm", x, w.vector(p + "ffn_norm.weight"), eps)
        gate = _scaled(w, t, il, p + "ffn_gate", h, "ffn_gate", "ffn_gate_s")  # scaled BEFORE the activation
        act = _activation(t, il, hp.activation, gate)
        up = _scaled(w, t, il, p + "ffn_up", h, "ffn_up", "ffn_up_s")
        f = t("ffn_sub_out", il, "MUL", act * up)
        f = ops.norm(t, il, "ffn_sub_norm", f, w.vector(p + "ffn_sub_norm.weight"), eps)
        x = t("l_out", il, "ADD", x + _scaled(w, t, il, p + "ffn_down", f, "ffn_down"))
    kv.advance(T)

    x = ops.norm(t, -1, "result_norm", x, w.vector("output_norm.weight"), eps)
    return t("result_output", -1, "MUL_MAT", w.linear("token_embd", x))
