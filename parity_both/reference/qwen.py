"""The qwen2 and qwen3 forward graphs (llama.cpp's src/models/qwen2.cpp, qwen3.cpp), in plain NumPy.

Differences from llama (llama.py):
    RoPE        NEOX: element i pairs with i + n_rot/2 (the converter does not permute Q/K rows)
    qwen2       Q/K/V projections carry biases (taken from the file when present); optional output.bias
    qwen3       no biases; RMSNorm over each Q and K head (attn_q_norm/attn_k_norm, [head_dim]) before
                RoPE; the head size (attention.key_length) need not be n_embd / n_head

    x = token_embd[ids]
    for each layer:
        h = rms_norm(x) * attn_norm
        q, k, v = Wq h + bq, Wk h + bk, Wv h + bv               (qwen2; qwen3 without biases)
        q, k = rms_norm_head(q) * q_norm, rms_norm_head(k) * k_norm   (qwen3)
        q, k = rope_neox(q), rope_neox(k)
        x = x + Wo softmax(q k^T / sqrt(hd) + causal mask) v
        x = x + Wd (silu(Wg h') * Wu h'),   h' = rms_norm(x) * ffn_norm
    logits = W_out (rms_norm(x) * output_norm) (+ output.bias)     W_out = output.weight or token_embd
"""

from __future__ import annotations

import numpy as np

from parity_both.reference import ops
from parity_both.reference.blocks import LayerRope, linear, output_logits, qkv, roped_qk
from parity_both.reference.hparams import HParams
from parity_both.reference.kv_cache import KVCache
from parity_both.reference.ops import Emit, Trace
from parity_both.reference.weights import WeightStore


def forward(hp: HParams, w: WeightStore, ids: np.ndarray, kv: KVCache, trace: Emit | None = None) -> np.ndarray:
    """Logits [len(ids), n_vocab] for ids at positions kv.n ..; their K/V are added to the cache."""
    t, eps, T, n_past = Trace(trace), hp.rms_eps, len(ids), kv.n
    rope = LayerRope(hp, w, n_past, T)
    x = t("inp_embd", -1, "GET_ROWS", w.rows_of("token_embd.weight", ids))
    w.release("token_embd.weight")
    for il in range(hp.n_layer):
        p = f"blk.{il}."
        h = ops.norm(t, il, "attn_norm", x, w.vector(p + "attn_norm.weight"), eps)
        q, k, v = qkv(hp, w, t, il, h)
        q, k = roped_qk(hp, w, t, il, q, k, rope)
        ks, vs = kv.append(il, k, v)
        a = ops.attention(q, ks, vs, n_past, hp.kq_scale, t, il, window=rope.window(il))
        x = t("ffn_inp", il, "ADD", x + linear(w, t, il, p + "attn_output", a, "kqv_out", node_with_bias="kqv_wo"))

        h = ops.norm(t, il, "ffn_norm", x, w.vector(p + "ffn_norm.weight"), eps)
        act = t("ffn_silu", il, "SILU", ops.silu(t("ffn_gate", il, "MUL_MAT", w.linear(p + "ffn_gate", h))))
        par = t("ffn_gate_par", il, "MUL", act * t("ffn_up", il, "MUL_MAT", w.linear(p + "ffn_up", h)))
        x = t("l_out", il, "ADD", x + t("ffn_out", il, "MUL_MAT", w.linear(p + "ffn_down", par)))
    kv.advance(T)

    x = ops.norm(t, -1, "result_norm", x, w.vector("output_norm.weight"), eps)
    return output_logits(w, t, x)
