"""The few numerical operations of a llama-family forward pass, in float32 NumPy.

Each op follows ggml's CPU kernel (ggml/src/ggml-cpu/ops.cpp) where the order of float
operations is visible in the result: sums of squares and softmax denominators are accumulated in
float64 (ggml_float), everything else is float32.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

F32 = np.float32


def rms(x: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps), row-wise (ggml_rms_norm)."""
    ss = np.sum(x * x, axis=-1, dtype=np.float64)
    mean = (ss / x.shape[-1]).astype(F32)
    scale = F32(1.0) / np.sqrt(mean + F32(eps))
    return x * scale[:, None]


def rope_cos_sin(
    pos: np.ndarray,
    n_rot: int,
    freq_base: float,
    freq_scale: float = 1.0,
    freq_factors: np.ndarray | None = None,
    attn_factor: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [T, n_rot/2] exactly as ggml_rope_cache_init builds them (no YaRN ramp):
    theta_0 = pos, theta_{i+1} = theta_i * base^(-2/n_rot) in float32; angle = freq_scale *
    theta_i / freq_factors[i]; values scaled by attn_factor (mscale)."""
    theta_scale = F32(np.float64(F32(freq_base)) ** np.float64(F32(-2.0) / F32(n_rot)))
    half = n_rot // 2
    theta = np.empty((len(pos), half), dtype=F32)
    t = np.asarray(pos, dtype=F32)
    for i in range(half):  # iterated product, as ggml does (not base ** (-2i/n))
        theta[:, i] = t
        t = t * theta_scale
    if freq_factors is not None:
        theta = theta / freq_factors[:half].astype(F32)
    theta = F32(freq_scale) * theta
    cos = np.cos(theta.astype(np.float64)).astype(F32)
    sin = np.sin(theta.astype(np.float64)).astype(F32)
    if attn_factor != 1.0:
        cos, sin = cos * F32(attn_factor), sin * F32(attn_factor)
    return cos, sin


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool) -> np.ndarray:
    """Rotate x [T, n_head, head_dim] over its first n_rot = 2*cos.shape[1] dims.

    normal (llama): pairs (2i, 2i+1); neox (bitnet, qwen, ...): pairs (i, i + n_rot/2).
    Dimensions beyond n_rot pass through unchanged."""
    half = cos.shape[1]
    n_rot = 2 * half
    out = x.copy()
    c = cos[:, None, :]
    s = sin[:, None, :]
    if neox:
        x0, x1 = x[..., :half], x[..., half:n_rot]
        out[..., :half] = x0 * c - x1 * s
        out[..., half:n_rot] = x0 * s + x1 * c
    else:
        x0, x1 = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        out[..., 0:n_rot:2] = x0 * c - x1 * s
        out[..., 1:n_rot:2] = x0 * s + x1 * c
    return out


def softmax(scores: np.ndarray, axis: int = -1) -> np.ndarray:
    """exp(s - max) / sum, the sum accumulated in float64 as ggml_soft_max does; -inf -> 0."""
    m = scores.max(axis=axis, keepdims=True)
    e = np.exp(scores - m)
    inv = (1.0 / e.sum(axis=axis, keepdims=True, dtype=np.float64)).astype(F32)
    return e * inv


def silu(x: np.ndarray) -> np.ndarray:
    """x / (1 + exp(-x)) (ggml_silu_f32)."""
    with np.errstate(over="ignore"):
        return x / (F32(1.0) + np.exp(-x))


_GELU_A, _SQRT_2_OVER_PI = F32(0.044715), F32(0.79788456080286535587989211986876)


def gelu(x: np.ndarray) -> np.ndarray:
    """GELU (tanh approximation) as ggml's CPU backend computes it (GGML_GELU_FP16, vec.h): x rounded to
    fp16, looked up in a table of fp16 values of 0.5 x (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2)));
    x <= -10 -> 0, x >= 10 -> x."""
    h = x.astype(np.float16).astype(F32)
    with np.errstate(over="ignore"):
        g = F32(0.5) * h * (F32(1.0) + np.tanh(_SQRT_2_OVER_PI * h * (F32(1.0) + _GELU_A * h * h)))
    g = g.astype(np.float16).astype(F32)
    return np.where(x <= F32(-10.0), F32(0.0), np.where(x >= F32(10.0), x, g)).astype(F32)


def softcap(x: np.ndarray, cap: float) -> np.ndarray:
    """cap * tanh(x / cap) as ggml_scale(1/cap), ggml_tanh, ggml_scale(cap) compute it in float32."""
    return np.tanh(x * (F32(1.0) / F32(cap))) * F32(cap)


# --------------------------------------------------------------------------------------------
# Tracing: intermediates reported under llama.cpp's node names
# --------------------------------------------------------------------------------------------
Emit = Callable[[str, str, np.ndarray], None]  # emit(name, op, array)


class Trace:
    """`t(name, il, op, a)` reports `a` as node `name-il` (`name` when il < 0, llama.cpp's naming)
    and returns `a`; a no-op without a callback. Arrays use llama.cpp's layout (numpy shape =
    reversed ggml ne) and are views: the callback copies what it keeps."""

    def __init__(self, emit: Emit | None = None):
        self.emit = emit

    def __bool__(self) -> bool:
        return self.emit is not None

    def __call__(self, name: str, il: int, op: str, a: np.ndarray) -> np.ndarray:
        if self.emit is not None:
            self.emit(f"{name}-{il}" if il >= 0 else name, op, a)
        return a


NO_TRACE = Trace()


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    n_past: int,
    kq_scale: float,
    t: Trace = NO_TRACE,
    il: int = -1,
    cont_name: str = "kqv_merged_cont",
    *,
    softcap_c: float = 0.0,
    window: int = 0,
) -> np.ndarray:
    """Causal GQA attention (llama.cpp's llm_build_kqv without flash attention).

    q [T, H, hd] at positions n_past.., k/v [S, Hkv, hd] (S = n_past + T); query head h reads kv
    head h // (H / Hkv). Returns [T, H * hd]. Traced: kq (H, T, S) = the unscaled k.q,
    kq_soft_max_ext (H, T, S), kqv (H, T, hd), kqv_merged (T, H, hd), cont_name (T, H * hd);
    llama.cpp's kq/kq_soft_max_ext span n_kv >= S cache cells (the extra ones masked).
    softcap_c > 0 (gemma2): kq = c * tanh(kq / c) before the softmax (traced kq_scaled_1, kq_tanh,
    kq_scaled_2); window > 0 (sliding-window layers): a key at distance >= window is masked too
    (llama.cpp's LLAMA_SWA_TYPE_STANDARD)."""
    T, H, hd = q.shape
    S, Hkv, _ = k.shape
    g = H // Hkv
    qh = q.transpose(1, 0, 2).reshape(Hkv, g * T, hd)  # query head h -> kv head h // g
    kq = t("kq", il, "MUL_MAT", (qh @ k.transpose(1, 2, 0)).reshape(H, T, S))
    if softcap_c > 0:
        kq = t("kq_scaled_1", il, "SCALE", kq * (F32(1.0) / F32(softcap_c)))
        kq = t("kq_scaled_2", il, "SCALE", t("kq_tanh", il, "TANH", np.tanh(kq)) * F32(softcap_c))
    scores = kq * F32(kq_scale)
    pos_q, pos_k = n_past + np.arange(T), np.arange(S)
    if T > 1 or window > 0:  # causal mask: query t (position n_past + t) sees keys 0 .. n_past + t
        mask = pos_k[None, :] > pos_q[:, None]
        if window > 0:
            mask |= pos_q[:, None] - pos_k[None, :] >= window
        scores[:, mask] = -np.inf
    p = t("kq_soft_max_ext", il, "SOFT_MAX", softmax(scores)).reshape(Hkv, g * T, S)
    out = t("kqv", il, "MUL_MAT", (p @ v.transpose(1, 0, 2)).reshape(H, T, hd))
    merged = t("kqv_merged", il, "PERMUTE", out.transpose(1, 0, 2))
    return t(cont_name, il, "CONT", merged.reshape(T, H * hd))


def norm(t: Trace, il: int, name: str, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """rms_norm(x) * weight, traced as llama.cpp's llm_build_norm names it: `norm`, then `name`."""
    return t(name, il, "MUL", t("norm", il, "RMS_NORM", rms(x, eps)) * weight)
