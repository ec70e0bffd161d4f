"""Emulate the arithmetic of ggml's CPU matmul for a quantized weight (the reference's "ggml" mode).

ggml never multiplies a quantized weight by float activations. ``ggml_compute_forward_mul_mat``
first converts each activation row to the weight type's ``vec_dot_type`` (ggml-cpu.c type traits)
and then takes blockwise integer dot products::

    Q4_0 Q5_0 Q8_0 Q1_0 IQ4_NL MXFP4 NVFP4 -> Q8_0   (per 32 values, fp16 scale)
    Q4_1 Q5_1                              -> Q8_1   (Q8_0 plus s = fp16(d * sum q))
    K-quants, IQ2/IQ3/IQ1, IQ4_XS, TQ1_0, TQ2_0 -> Q8_K (per 256 values, f32 scale)
    F16 -> activations rounded to fp16; BF16 -> to bf16; F32 -> plain float
    I2_S (BitNet.cpp) -> per-token int8: s = 127 / max(max|x|, 1e-5), q = clip(rint(x s), -128, 127),
                         out = (sum code*q - sum q) / s * scale  (= sum t*q / s * scale)

What is exact and what is not
-----------------------------
* The activation quantization is bit-exact with what runs on x86: ``quantize_row_q8_0`` /
  ``quantize_row_q8_1`` (arch/x86/quants.c: id = 127/amax, round-half-even, fp16 scale; Q8_1's
  s = fp16(d * sum)) and ``quantize_row_q8_K_ref`` (iscale = -127/x[argmax|x|], nearest_int =
  round-half-even, min(127, q), d = 1/iscale). The repack (q4_0_8x8) and AMX paths use the same
  rounding, so this holds whichever kernel llama.cpp picks. (The generic C reference,
  ``quantize_row_q8_0_ref``, rounds half away from zero with id = 1/d: it is NOT what x86 runs.)
* Each per-block integer dot product and each per-block scale is exact. The products and the sum
  over blocks are formed in float64 and rounded to float32 once, i.e. we return the correctly
  rounded value of the quantity ggml computes. ggml itself accumulates in float32 in an order
  that depends on the kernel (vec_dot AVX2 lanes with FMA, llamafile tinyBLAS for batches, the
  Q4_0 8x8 repack, AMX tiles), so it differs from us by float32 rounding only: typically ~1e-7
  relative to sum |terms|, far below the 1e-3..1e-2 effect of the activation quantization itself.
* Q4_1/Q5_1: the min term uses the activation's fp16-rounded s exactly as ggml does
  (m * s, not m * d * sum q) - a ~5e-4 relative effect on that term that a naive emulation misses.
* K-quants and IQ types: weights are taken from gguf-py's float32 dequantization; the K-quant
  dequantization rounds d*sc*q - dmin*m in float32 where the dot product keeps the two sums apart,
  so these are exact only up to that float32 rounding (~1e-7 relative). Not used by our fixtures.
* I2_S follows BitNet.cpp as described in the project notes (its sources are not vendored here):
  s is computed in double from the float max and rounded to float32; out = (isum / s) * scale in
  float32.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gq

from parity_both.gguf.quants import QuantError, dequantize, unpack_i2s

_Q8_0_PARTNERS = {"Q4_0", "Q5_0", "Q8_0", "Q1_0", "IQ4_NL", "MXFP4", "NVFP4"}
_Q8_1_PARTNERS = {"Q4_1", "Q5_1"}
_Q8_K_PARTNERS = {
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "IQ2_XXS",
    "IQ2_XS",
    "IQ2_S",
    "IQ3_XXS",
    "IQ3_S",
    "IQ1_S",
    "IQ1_M",
    "IQ4_XS",
    "TQ1_0",
    "TQ2_0",
}


def vec_dot_type(type_name: str) -> str:
    """The activation type ggml converts to for a weight of this type (I8_S for BitNet's I2_S)."""
    if type_name in _Q8_0_PARTNERS:
        return "Q8_0"
    if type_name in _Q8_1_PARTNERS:
        return "Q8_1"
    if type_name in _Q8_K_PARTNERS:
        return "Q8_K"
    if type_name in ("F32", "F16", "BF16"):
        return type_name
    if type_name == "I2_S":
        return "I8_S"
    raise QuantError(f"no ggml matmul emulation for weight type {type_name!r}")


# --- activation quantizers (return integer codes and the scales as the dot product reads them) ----
def _blocks(x: np.ndarray, block: int, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] % block:
        raise QuantError(f"{what} needs [T, K] activations with K a multiple of {block}, got {x.shape}")
    return x.reshape(x.shape[0], -1, block)


def quantize_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x86 ``quantize_row_q8_0``: (q int8 [T, nb, 32], d float32 [T, nb] = the stored fp16 scale)."""
    xb = _blocks(x, 32, "Q8_0")
    amax = np.abs(xb).max(axis=2)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(xb * inv[..., None]).astype(np.int8)  # f32 product, round half to even
    return q, d.astype(np.float16).astype(np.float32)


def quantize_q8_1(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x86 ``quantize_row_q8_1``: (q, d, s) with d = fp16(amax/127), s = fp16(f32(amax/127) * sum q)."""
    xb = _blocks(x, 32, "Q8_1")
    amax = np.abs(xb).max(axis=2)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(xb * inv[..., None]).astype(np.int8)
    s = (d * q.sum(axis=2, dtype=np.int32).astype(np.float32)).astype(np.float32)
    return q, d.astype(np.float16).astype(np.float32), s.astype(np.float16).astype(np.float32)


def quantize_q8_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``quantize_row_q8_K_ref`` (what x86 runs): (q int8 [T, nb, 256], d float32 [T, nb])."""
    xb = _blocks(x, 256, "Q8_K")
    idx = np.abs(xb).argmax(axis=2)  # first element of largest |x|, as the C loop's strict '>'
    vmax = np.take_along_axis(xb, idx[..., None], axis=2)[..., 0]
    zero = vmax == 0
    with np.errstate(divide="ignore"):
        iscale = np.where(zero, np.float32(0), np.float32(-127) / np.where(zero, 1, vmax)).astype(np.float32)
    q = np.minimum(np.rint(xb * iscale[..., None]), 127).astype(np.int8)
    with np.errstate(divide="ignore"):
        d = np.where(zero, np.float32(0), np.float32(1) / np.where(zero, 1, iscale)).astype(np.float32)
    return q, d


def quantize_i8_s(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BitNet.cpp's per-token int8 activations: (q int8 [T, K], s float32 [T])."""
    x = np.asarray(x, dtype=np.float32)
    amax = np.maximum(np.abs(x).max(axis=1).astype(np.float64), 1e-5)
    s = (127.0 / amax).astype(np.float32)
    q = np.clip(np.rint(x * s[:, None]), -128, 127).astype(np.int8)
    return q, s


def round_fp16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_BF16: round to nearest even on the upper 16 bits (NaN kept quiet)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    r = np.where(nan, ((u >> 16) | 64).astype(np.uint32) << 16, r)
    return r.view(np.float32)


def activation_operand(x: np.ndarray, type_name: str) -> np.ndarray:
    """The activations as ggml's dot product sees them, as float64 [T, K] (d * q, exact)."""
    partner = vec_dot_type(type_name)
    if partner == "Q8_0":
        q, d = quantize_q8_0(x)
    elif partner == "Q8_1":
        q, d, _ = quantize_q8_1(x)
    elif partner == "Q8_K":
        q, d = quantize_q8_k(x)
    elif partner == "F16":
        return round_fp16(x).astype(np.float64)
    elif partner == "BF16":
        return round_bf16(x).astype(np.float64)
    elif partner == "F32":
        return np.asarray(x, dtype=np.float32).astype(np.float64)
    else:
        q8, s = quantize_i8_s(x)
        return q8.astype(np.float64) / s.astype(np.float64)[:, None]
    return (q.astype(np.float64) * d.astype(np.float64)[..., None]).reshape(q.shape[0], -1)


# --- weights -------------------------------------------------------------------------------------
def _row_nbytes(type_name: str, cols: int) -> int:
    plain = {"F32": 4, "F16": 2, "BF16": 2}
    if type_name in plain:
        return cols * plain[type_name]
    blk, size = gq.GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    if cols % blk:
        raise QuantError(f"{type_name} rows need a multiple of {blk} elements, got {cols}")
    return cols // blk * size


def _q_1_parts(raw_rows: np.ndarray, type_name: str, n_rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_1 / Q5_1 weights split as ggml's dot product uses them: (d*q [R, K], m [R, nb])."""
    size = 20 if type_name == "Q4_1" else 24
    b = raw_rows.reshape(-1, size)
    d = b[:, 0:2].copy().view("<f2").astype(np.float64)
    m = b[:, 2:4].copy().view("<f2").astype(np.float64).reshape(n_rows, cols // 32)
    qs = b[:, -16:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int32)  # elements 0..15, 16..31
    if type_name == "Q5_1":
        qh = b[:, 4:8].copy().view("<u4")  # bit j = 5th bit of element j
        q |= (((qh >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.int32)
    return (d * q).reshape(n_rows, cols), m


def ggml_linear(
    x: np.ndarray, raw: np.ndarray, type_name: str, rows: int, cols: int, *, chunk_rows: int = 4096
) -> np.ndarray:
    """y = W x as ggml computes it: x [T, cols] float32, W [rows, cols] in ``raw`` bytes -> [T, rows]."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.shape[1] != cols:
        raise QuantError(f"activations have {x.shape[1]} columns, weight has {cols}")
    raw = np.asarray(raw, dtype=np.uint8).reshape(-1)
    out = np.empty((x.shape[0], rows), dtype=np.float32)

    if type_name == "I2_S":
        # BitNet.cpp: integer dot product of the ternary codes with the per-token int8 activations,
        # then (isum / s) * scale in float32. Integer sums are exact in float64 BLAS.
        q8, s = quantize_i8_s(x)
        t, scale = unpack_i2s(raw, rows * cols)
        t = t.reshape(rows, cols)
        qa = q8.astype(np.float64)
        for r0 in range(0, rows, chunk_rows):
            isum = (qa @ t[r0 : r0 + chunk_rows].astype(np.float64).T).astype(np.float32)
            out[:, r0 : r0 + chunk_rows] = (isum / s[:, None]) * scale
        return out

    a = activation_operand(x, type_name)
    rb = _row_nbytes(type_name, cols)
    if raw.size < rows * rb:
        raise QuantError(f"{type_name} [{rows} x {cols}] needs {rows * rb} bytes, got {raw.size}")
    s_q8_1 = quantize_q8_1(x)[2].astype(np.float64) if type_name in _Q8_1_PARTNERS else None
    for r0 in range(0, rows, chunk_rows):
        n = min(chunk_rows, rows - r0)
        part = raw[r0 * rb : (r0 + n) * rb]
        if s_q8_1 is not None:
            w, m = _q_1_parts(part, type_name, n, cols)
            # ggml: sum_b d_x d_y sum(q_x q_y) + m_x * s_y, with s_y the fp16-rounded d_y * sum q_y
            y = a @ w.T + s_q8_1 @ m.T
        else:
            w = dequantize(part, type_name, n * cols).reshape(n, cols).astype(np.float64)
            y = a @ w.T
        out[:, r0 : r0 + n] = y
    return out


def exact_linear(x: np.ndarray, raw: np.ndarray, type_name: str, rows: int, cols: int) -> np.ndarray:
    """y = W x with float activations (no activation quantization): the "exact" reference mode."""
    w = dequantize(raw, type_name, rows * cols).reshape(rows, cols).astype(np.float64)
    return (np.asarray(x, dtype=np.float64) @ w.T).astype(np.float32)
