"""Layer pieces shared by the forward graphs beyond llama/bitnet (qwen.py, phi3.py, gemma.py, and
llama.py's experts), each traced under llama.cpp's node names (see trace.py):

    linear      W x (+ bias)                                      Qcur / Qcur[ADD], ffn_up, ...
    qkv         Q, K, V from attn_q/k/v (+ biases) or one fused attn_qkv
    head_norm   RMSNorm over each head with attn_q_norm/attn_k_norm  norm, Qcur_normed
    rope_for    the cos/sin tables of a layer (sliding-window layers have their own RoPE)
    moe_ffn     llama.cpp's build_moe_ffn (router softmax, top-k, renormalised weights, experts)
"""

from __future__ import annotations

import numpy as np

from parity_both.reference import ops
from parity_both.reference.hparams import HParams, Rope
from parity_both.reference.ops import Trace
from parity_both.reference.weights import WeightStore

F32 = np.float32


def linear(
    w: WeightStore,
    t: Trace,
    il: int,
    tensor: str,
    x: np.ndarray,
    node: str,
    bias_node: str | None = None,
    node_with_bias: str | None = None,
) -> np.ndarray:
    """W x (+ bias if the model has one). Traced as llama.cpp names them: the matmul is `node`
    (`node_with_bias` when a bias follows), the bias add `bias_node` (default: `node`)."""
    has_bias = w.has(tensor + ".bias")
    y = t(node_with_bias if has_bias and node_with_bias else node, il, "MUL_MAT", w.linear(tensor, x))
    if has_bias:
        y = t(bias_node or node, il, "ADD", y + w.vector(tensor + ".bias"))
    return y


def qkv(hp: HParams, w: WeightStore, t: Trace, il: int, h: np.ndarray) -> tuple[np.ndarray, ...]:
    """Q [T, H, hd], K and V [T, Hkv, hd]: separate projections (each traced, with its bias), or one
    fused attn_qkv split as [q | k | v] (+ its bias, or separate q/k/v biases), traced as llama.cpp 0.3.36
    names it: wqkv (wqkv_b), then Qcur/Kcur/Vcur views."""
    p, T, hd = f"blk.{il}.", len(h), hp.head_dim
    nq, nk = hp.n_head * hd, hp.n_head_kv * hd
    if w.has(p + "attn_qkv.weight"):
        y = t("wqkv", il, "MUL_MAT", w.linear(p + "attn_qkv", h))
        if w.has(p + "attn_qkv.bias"):
            y = t("wqkv_b", il, "ADD", y + w.vector(p + "attn_qkv.bias"))
        elif all(w.has(p + f"attn_{n}.bias") for n in "qkv"):
            y = t("wqkv_b", il, "ADD", y + np.concatenate([w.vector(p + f"attn_{n}.bias") for n in "qkv"]))
        q, k, v = y[:, :nq], y[:, nq : nq + nk], y[:, nq + nk :]
        heads = ((q, hp.n_head), (k, hp.n_head_kv), (v, hp.n_head_kv))
        q, k, v = (t(f"{n}cur", il, "VIEW", a.reshape(T, nh, hd)) for n, (a, nh) in zip("QKV", heads, strict=True))
    else:
        q, k, v = (linear(w, t, il, p + f"attn_{n}", h, f"{n.upper()}cur") for n in "qkv")
    return q.reshape(T, hp.n_head, hd), k.reshape(T, hp.n_head_kv, hd), v.reshape(T, hp.n_head_kv, hd)


def head_norm(hp: HParams, w: WeightStore, t: Trace, il: int, x: np.ndarray, which: str) -> np.ndarray:
    """RMSNorm of each head [T, heads, hd] times attn_{q,k}_norm (qwen3, gemma3), traced norm, {Q,K}cur_normed."""
    T, n, hd = x.shape
    normed = t("norm", il, "RMS_NORM", ops.rms(x.reshape(T * n, hd), hp.rms_eps).reshape(T, n, hd))
    return t(f"{which.upper()}cur_normed", il, "MUL", normed * w.vector(f"blk.{il}.attn_{which}_norm.weight"))


def roped_qk(
    hp: HParams, w: WeightStore, t: Trace, il: int, q: np.ndarray, k: np.ndarray, rope: LayerRope
) -> tuple[np.ndarray, np.ndarray]:
    """Q and K after their per-head RMSNorm (qwen3, gemma3: `qk_norm`) and RoPE, traced as llama.cpp does."""
    if hp.qk_norm:
        q = head_norm(hp, w, t, il, q, "q")
    q = t("Qcur", il, "ROPE", rope(il, q))
    if hp.qk_norm:
        k = head_norm(hp, w, t, il, k, "k")
    return q, t("Kcur", il, "ROPE", rope(il, k))


def output_logits(w: WeightStore, t: Trace, x: np.ndarray) -> np.ndarray:
    """The LM head: `output.weight` (else the tied embedding), plus `output.bias` where the model has one."""
    logits = w.linear("output" if w.has("output.weight") else "token_embd", x)
    if w.has("output.bias"):
        logits = logits + w.vector("output.bias")
    return t("result_output", -1, "ADD" if w.has("output.bias") else "MUL_MAT", logits)


def rope_tables(rope: Rope, w: WeightStore, n_past: int, T: int) -> tuple[np.ndarray, np.ndarray]:
    factors = w.vector("rope_freqs.weight") if rope.freq_factors else None
    return ops.rope_cos_sin(
        np.arange(n_past, n_past + T), rope.n_rot, rope.freq_base, rope.freq_scale, factors, rope.attn_factor
    )


class LayerRope:
    """The RoPE tables of each layer: the model's, or the sliding-window layers' own (hp.swa.rope)."""

    def __init__(self, hp: HParams, w: WeightStore, n_past: int, T: int):
        self.hp = hp
        self.main = rope_tables(hp.rope, w, n_past, T)
        self.swa = rope_tables(hp.swa.rope, w, n_past, T) if hp.swa is not None else None

    def sliding(self, il: int) -> bool:
        return self.hp.swa is not None and self.hp.swa.layers[il]

    def window(self, il: int) -> int:
        return self.hp.swa.window if self.hp.swa is not None and self.sliding(il) else 0

    def __call__(self, il: int, x: np.ndarray) -> np.ndarray:
        cos, sin = self.swa if self.sliding(il) and self.swa is not None else self.main
        return ops.rope(x, cos, sin, neox=self.hp.rope.rope_type == "neox")


def _expert_linear(w: WeightStore, name: str, e: int, x: np.ndarray) -> np.ndarray:
    """x @ W_e^T for expert e of a stacked [n_expert, rows, cols] tensor (ggml ne (cols, rows, n_expert))."""
    rows = w.info(name + ".weight").shape[1]
    return w.linear_rows(name, e * rows, (e + 1) * rows, x)


def moe_ffn(hp: HParams, w: WeightStore, t: Trace, il: int, h: np.ndarray) -> np.ndarray:
    """llama.cpp's build_moe_ffn for llama-arch experts (Mixtral), h [T, d] -> [T, d]:
    probs = softmax(W_router h)                      over all n_expert
    sel   = the n_used largest probs (descending)    ggml_argsort_top_k
    wts   = probs[sel] / max(sum(probs[sel]), 6.1e-5)  renormalised (norm_w)
    y_j   = W_down[e_j] (silu(W_gate[e_j] h) * W_up[e_j] h) * wts_j, summed over j in order."""
    m = hp.moe
    assert m is not None
    p = f"blk.{il}."
    logits = t("ffn_moe_logits", il, "MUL_MAT", w.linear(p + "ffn_gate_inp", h))
    probs = t("ffn_moe_probs", il, "SOFT_MAX", ops.softmax(logits))
    sel = np.argsort(-probs, axis=1, kind="stable")[:, : m.n_used]
    wts = t("ffn_moe_weights", il, "GET_ROWS", np.take_along_axis(probs, sel, axis=1)[..., None])[..., 0]
    if m.norm_w:
        total = t("ffn_moe_weights_sum", il, "SUM_ROWS", wts.sum(axis=1, keepdims=True, dtype=np.float64).astype(F32))
        wts = t("ffn_moe_weights_norm", il, "DIV", (wts / np.maximum(total, F32(6.103515625e-5)))[..., None])[..., 0]
    if m.weights_scale not in (0.0, 1.0):
        wts = wts * F32(m.weights_scale)
    T, k, d = len(h), m.n_used, h.shape[1]
    gate = np.zeros((T, k, hp.n_ff), F32)
    up = np.zeros((T, k, hp.n_ff), F32)
    for e in np.unique(sel):
        rows, slots = np.nonzero(sel == e)
        gate[rows, slots] = _expert_linear(w, p + "ffn_gate_exps", int(e), h[rows])
        up[rows, slots] = _expert_linear(w, p + "ffn_up_exps", int(e), h[rows])
    t("ffn_moe_gate", il, "MUL_MAT_ID", gate)
    act = t("ffn_moe_silu", il, "SILU", ops.silu(gate))
    t("ffn_moe_up", il, "MUL_MAT_ID", up)
    par = t("ffn_moe_gate_par", il, "MUL", act * up)
    down = np.zeros((T, k, d), F32)
    for e in np.unique(sel):
        rows, slots = np.nonzero(sel == e)
        down[rows, slots] = _expert_linear(w, p + "ffn_down_exps", int(e), par[rows, slots])
    t("ffn_moe_down", il, "MUL_MAT_ID", down)
    weighted = t("ffn_moe_weighted", il, "MUL", down * wts[..., None])
    out = weighted[:, 0]
    for j in range(1, k):
        out = out + weighted[:, j]
    return t("ffn_moe_out", il, "ADD" if k > 1 else "CONT", out)
