"""The few numerical operations of a llama-family forward pass, in float32 NumPy.

Each op follows ggml's CPU kernel (ggml/src/ggml-cpu/ops.cpp) where the order of float
operations is visible in the result: sums of squares and softmax denominators are accumulated in
float64 (ggml_float), everything else is float32.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

F32 = np.float32
MODES = ("exact", "ggml")


class MatrixLike(Protocol):
    """What `linear` needs from a weight (see weights.Weight)."""

    name: str
    type_name: str
    rows: int
    cols: int

    def dense_rows(self, r0: int, r1: int) -> np.ndarray: ...
    def raw(self) -> np.ndarray: ...
    def release(self) -> None: ...


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight, row-wise (ggml_rms_norm then ggml_mul)."""
    ss = np.sum(x * x, axis=-1, dtype=np.float64)
    mean = (ss / x.shape[-1]).astype(F32)
    scale = F32(1.0) / np.sqrt(mean + F32(eps))
    return (x * scale[:, None]) * weight


def rope_cos_sin(pos: np.ndarray, n_rot: int, freq_base: float, freq_scale: float = 1.0,
                 freq_factors: np.ndarray | None = None, attn_factor: float = 1.0
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


def relu2(x: np.ndarray) -> np.ndarray:
    """relu(x)^2 (squared ReLU, BitNet b1.58 as trained)."""
    r = np.maximum(x, F32(0.0))
    return r * r


ACTIVATIONS = {"silu": silu, "relu2": relu2}


def _ggml_linear(x: np.ndarray, w: MatrixLike) -> np.ndarray:
    try:
        from parity_both.reference.ggml_emul import ggml_linear  # noqa: PLC0415 - optional, lazily imported
    except ImportError as e:
        raise NotImplementedError(
            f"mode='ggml' needs parity_both.reference.ggml_emul.ggml_linear for {w.type_name} weights ({w.name}); "
            "the module is not available") from e
    y = ggml_linear(np.ascontiguousarray(x, dtype=F32), w.raw(), w.type_name, w.rows, w.cols)
    return np.asarray(y, dtype=F32)


def linear(x: np.ndarray, w: MatrixLike, mode: str = "exact", *, chunk_rows: int | None = None,
           release: bool = True) -> np.ndarray:
    """y = x @ W^T for x [T, cols] -> [T, rows] (ggml_mul_mat(W, x)).

    exact: float32 matmul on the dequantized weight, read in row blocks of `chunk_rows` (the whole
    matrix when None) so a big LM head never sits in memory whole; ggml: F32 weights as in exact,
    every other type through parity_both.reference.ggml_emul (which quantizes the activations as ggml does).
    The weight's pages are released afterwards unless release=False."""
    if x.shape[-1] != w.cols:
        raise ValueError(f"{w.name}: input has {x.shape[-1]} features, weight has {w.cols} columns")
    if mode == "ggml" and w.type_name != "F32":
        y = _ggml_linear(x, w)
    elif mode in MODES:
        step = w.rows if chunk_rows is None else max(1, chunk_rows)
        if step >= w.rows:
            y = x @ w.dense_rows(0, w.rows).T
        else:
            y = np.empty((x.shape[0], w.rows), dtype=F32)
            for r0 in range(0, w.rows, step):
                r1 = min(w.rows, r0 + step)
                np.matmul(x, w.dense_rows(r0, r1).T, out=y[:, r0:r1])
                if release:
                    w.release()
    else:
        raise ValueError(f"unknown reference mode {mode!r} (expected one of {MODES})")
    if release:
        w.release()
    return y
