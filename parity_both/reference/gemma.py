"""The gemma2 and gemma3 forward graphs (llama.cpp's src/models/gemma2.cpp, gemma3.cpp), in plain NumPy.

Differences from llama (llama.py):
    embeddings  token_embd rows times sqrt(n_embd) (float32)
    RoPE        NEOX; sliding-window layers use their own base (rope.freq_base_swa) and, in gemma3, no
                linear scaling; global layers the model's base and scale
    attention   Q scaled by 1/sqrt(hd) (1/sqrt(n_embd/n_head) for the 27B sizes) before K.Q;
                gemma2: scores soft-capped, c * tanh(kq / c), c = attn_logit_softcapping;
                sliding-window layers mask keys at distance >= attention.sliding_window
    gemma3      RMSNorm over each Q and K head (attn_q_norm/attn_k_norm) before RoPE; no attention
                soft-capping; final soft-capping only when the file declares it
    norms       the attention output and the FFN output are RMS-normalised again (attn_post_norm,
                ffn_post_norm) before their residual adds (the GGUF norm weights already hold 1 + w)
    FFN         GELU (tanh approximation, through ggml's fp16 table: ops.gelu) instead of SiLU
    LM head     gemma2: token_embd always; gemma3: output.weight if present, else token_embd;
                logits soft-capped c * tanh(logits / c), c = final_logit_softcapping (gemma2 default 30)

    x = token_embd[ids] * sqrt(d)
    for each layer:
        h = rms_norm(x) * attn_norm
        q, k, v = Wq h, Wk h, Wv h;  q, k = head norms (gemma3);  q, k = rope_neox(q), rope_neox(k)
        s = (q * scale) k^T;  s = softcap(s) (gemma2);  mask causal (+ window on sliding layers)
        x = x + rms_norm(Wo softmax(s) v) * attn_post_norm
        x = x + rms_norm(Wd (gelu(Wg h') * Wu h')) * ffn_post_norm,   h' = rms_norm(x) * ffn_norm
    logits = softcap(W_out (rms_norm(x) * output_norm))
"""

from __future__ import annotations

import numpy as np

from parity_both.reference import ops
from parity_both.reference.blocks import LayerRope, qkv, roped_qk
from parity_both.reference.hparams import HParams
from parity_both.reference.kv_cache import KVCache
from parity_both.reference.ops import Emit, Trace
from parity_both.reference.weights import WeightStore

F32 = np.float32


def forward(hp: HParams, w: WeightStore, ids: np.ndarray, kv: KVCache, trace: Emit | None = None) -> np.ndarray:
    """Logits [len(ids), n_vocab] for ids at positions kv.n ..; their K/V are added to the cache."""
    t, eps, T, n_past = Trace(trace), hp.rms_eps, len(ids), kv.n
    rope = LayerRope(hp, w, n_past, T)
    x = t("inp_embd", -1, "GET_ROWS", w.rows_of("token_embd.weight", ids))
    w.release("token_embd.weight")
    x = t("inp_scaled", -1, "SCALE", x * F32(hp.embd_scale))
    post_il = -1 if hp.arch == "gemma2" else None  # gemma2 names ffn_post_norm without the layer, gemma3 with
    for il in range(hp.n_layer):
        p = f"blk.{il}."
        h = ops.norm(t, il, "attn_norm", x, w.vector(p + "attn_norm.weight"), eps)
        q, k, v = qkv(hp, w, t, il, h)
        q, k = roped_qk(hp, w, t, il, q, k, rope)
        ks, vs = kv.append(il, k, v)
        a = ops.attention(
            q * F32(hp.kq_scale), ks, vs, n_past, 1.0, t, il, softcap_c=hp.attn_softcap, window=rope.window(il)
        )
        a = w.linear(p + "attn_output", a)  # unnamed in llama.cpp's gemma graphs
        a = ops.norm(t, il, "attn_post_norm", a, w.vector(p + "post_attention_norm.weight"), eps)
        x = t("sa_out", il, "ADD", a + x)

        h = ops.norm(t, il, "ffn_norm", x, w.vector(p + "ffn_norm.weight"), eps)
        act = t("ffn_gelu", il, "GELU", ops.gelu(t("ffn_gate", il, "MUL_MAT", w.linear(p + "ffn_gate", h))))
        par = t("ffn_gate_par", il, "MUL", act * t("ffn_up", il, "MUL_MAT", w.linear(p + "ffn_up", h)))
        f = t("ffn_out", il, "MUL_MAT", w.linear(p + "ffn_down", par))
        f = t("norm", -1, "RMS_NORM", ops.rms(f, eps))  # llama.cpp builds this norm with il = -1
        f = t("ffn_post_norm", il if post_il is None else post_il, "MUL", f * w.vector(p + "post_ffw_norm.weight"))
        x = t("l_out", il, "ADD", f + x)
    kv.advance(T)

    x = ops.norm(t, -1, "result_norm", x, w.vector("output_norm.weight"), eps)
    head = "output" if hp.arch == "gemma3" and w.has("output.weight") else "token_embd"
    logits = w.linear(head, x)
    if hp.final_softcap > 0:
        return t("result_output", -1, "SCALE", ops.softcap(logits, hp.final_softcap))
    return t("result_output", -1, "MUL_MAT", logits)
