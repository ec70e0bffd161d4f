"""Dequantization of GGUF tensor bytes, including BitNet.cpp's I2_S.

One entry point, ``dequantize(raw, type_name, n_elements)``, for every type gguf-py can dequantize
(F32, F16, BF16, Q4_0 ... Q8_0, K-quants, IQ*, TQ1_0, TQ2_0, MXFP4, NVFP4), the plain integer/float
types, the activation-only types Q8_1/Q8_K and mainline's Q1_0 (gguf 0.19 has no code for these
three), and BitNet.cpp's I2_S (x86 layout, see ``I2S_*`` below). BitNet.cpp's I8_S, TL1 and TL2 are
refused with a message: their layouts depend on the build (TL1/TL2 are generated per model shape).

Type names are the ggml names as ``gguf_file.TensorInfo.type_name`` gives them; the numbering
(36 = I2_S in BitNet.cpp, retired in mainline) is decided by the reader, not here.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gq

from parity_both.gguf.constants import I2S_BLOCK, I2S_TAIL_BYTES

# --- I2_S (BitNet.cpp, x86 build, the layout its quantizer writes by default) --------------------
# Row-major ternary weights in blocks of 128 elements stored in 32 bytes: element j of a block sits
# in byte j % 32 at bit shift 6 - 2*(j // 32) (most significant pair first); codes 0/1/2 mean
# -1/0/+1 (3 is never written and reads as 0). After the n/4 packed bytes: ONE float32 per-tensor
# scale, then 28 bytes of padding (n/4 + 32 bytes in all). Source: BitNet.cpp's quantize_i2_s as
# described in the project notes (formats-and-graphs.md); BitNet.cpp's sources are not vendored.
I2S_BLOCK_BYTES = 32
_I2S_SHIFTS = np.array([6, 4, 2, 0], dtype=np.uint8)  # field g of a byte holds element g*32 + byte
# code -> ternary value; code 3 is never written by BitNet.cpp: read it as 0 like its kernels do
_I2S_VALUES = np.array([-1, 0, 1, 0], dtype=np.int8)

# BitNet.cpp types whose bytes we cannot interpret: refuse rather than guess.
REFUSED_TYPES: dict[str, str] = {
    "I8_S": "BitNet.cpp's int8 activation type I8_S is an internal type; a model tensor of this type "
    "is not expected and its layout is not documented",
    "TL1": "BitNet.cpp's TL1 is a lookup-table layout generated per model shape (ARM kernels); "
    "re-convert the model to I2_S (BitNet.cpp setup_env.py --quant-type i2_s) or to TQ2_0",
    "TL2": "BitNet.cpp's TL2 is a lookup-table layout generated per model shape (x86 kernels); "
    "re-convert the model to I2_S (BitNet.cpp setup_env.py --quant-type i2_s) or to TQ2_0",
}

_PLAIN: dict[str, str] = {
    "F32": "<f4",
    "F16": "<f2",
    "F64": "<f8",
    "I8": "<i1",
    "I16": "<i2",
    "I32": "<i4",
    "I64": "<i8",
}


class QuantError(ValueError):
    """Tensor bytes this module cannot dequantize; the message says why."""


def i2s_nbytes(n_elements: int) -> int:
    return n_elements // 4 + I2S_TAIL_BYTES


def _check_i2s(n_elements: int) -> None:
    if n_elements % I2S_BLOCK:
        raise QuantError(f"I2_S needs a multiple of {I2S_BLOCK} elements, got {n_elements}")


def pack_i2s(ternary: np.ndarray, scale: float) -> bytes:
    """Pack ternary weights (values in {-1, 0, +1}, row-major [M, K]) and the per-tensor scale."""
    t = np.asarray(ternary)
    if t.size % I2S_BLOCK:
        raise QuantError(f"I2_S needs a multiple of {I2S_BLOCK} elements, got {t.size}")
    if t.ndim == 2 and t.shape[1] % I2S_BLOCK:
        raise QuantError(f"I2_S needs rows of a multiple of {I2S_BLOCK} elements, got K={t.shape[1]}")
    flat = t.reshape(-1)
    if not np.isin(flat, (-1, 0, 1)).all():
        raise QuantError("pack_i2s expects ternary values in {-1, 0, +1}; scale them first")
    codes = (flat.astype(np.int16) + 1).astype(np.uint8).reshape(-1, 4, I2S_BLOCK_BYTES)
    packed = np.bitwise_or.reduce(codes << _I2S_SHIFTS[None, :, None], axis=1).astype(np.uint8)
    tail = np.zeros(I2S_TAIL_BYTES, dtype=np.uint8)
    tail[:4] = np.frombuffer(np.float32(scale).tobytes(), dtype=np.uint8)
    return packed.tobytes() + tail.tobytes()


def unpack_i2s(raw: np.ndarray, n_elements: int) -> tuple[np.ndarray, np.float32]:
    """(ternary int8 values in file order, per-tensor float32 scale) of an I2_S tensor."""
    _check_i2s(n_elements)
    raw = np.asarray(raw, dtype=np.uint8).reshape(-1)
    packed_len = n_elements // 4
    if raw.size < packed_len + 4:
        raise QuantError(f"I2_S tensor of {n_elements} elements needs {i2s_nbytes(n_elements)} bytes, got {raw.size}")
    blocks = raw[:packed_len].reshape(-1, 1, I2S_BLOCK_BYTES)
    codes = (blocks >> _I2S_SHIFTS[None, :, None]) & 3  # [n_blocks, 4, 32] -> element g*32 + byte
    scale = raw[packed_len : packed_len + 4].copy().view("<f4")[0]
    return _I2S_VALUES[codes.reshape(-1)], np.float32(scale)


def i2s_to_tq2_0(raw: np.ndarray, n_elements: int) -> tuple[bytes, float]:
    """Rewrite an I2_S tensor as TQ2_0 (rows must be multiples of 256 elements).

    A TQ2_0 block (256 elements) is two I2_S blocks with each byte's four 2-bit fields in reverse
    order (TQ2_0 puts element m + 32*l at shift 2*l) and the same codes (q = t + 1). Only the
    scale changes: TQ2_0 has an fp16 scale per block where I2_S has one float32 per tensor.
    Returns (TQ2_0 bytes, relative change of the scale |fp16(s) - s| / |s|).
    """
    _check_i2s(n_elements)
    if n_elements % 256:
        raise QuantError(f"TQ2_0 needs a multiple of 256 elements, got {n_elements}")
    raw = np.asarray(raw, dtype=np.uint8).reshape(-1)
    packed = raw[: n_elements // 4]
    _, scale = unpack_i2s(raw, n_elements)
    # reverse the 2-bit fields of every byte; code 3 (never written) becomes 1 (zero) as I2_S reads it
    fields = [(packed >> s) & 3 for s in (6, 4, 2, 0)]
    fields = [np.where(f == 3, 1, f).astype(np.uint8) for f in fields]
    qs = (fields[0] | (fields[1] << 2) | (fields[2] << 4) | (fields[3] << 6)).astype(np.uint8)
    d = np.float16(scale)
    blocks = np.empty((n_elements // 256, 66), dtype=np.uint8)
    blocks[:, :64] = qs.reshape(-1, 64)
    blocks[:, 64:] = np.frombuffer(d.tobytes(), dtype=np.uint8)
    rel = abs(float(d) - float(scale)) / abs(float(scale)) if scale != 0 else 0.0
    return blocks.tobytes(), rel


# --- types gguf-py 0.19 has no dequantizer for ------------------------------------------------------
def _f16(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view("<f2").astype(np.float32)


def _dequant_q8_1(blocks: np.ndarray) -> np.ndarray:  # fp16 d, fp16 s (= d * sum), int8 qs[32]
    d = _f16(blocks[:, 0:2])
    return (d * blocks[:, 4:].view(np.int8).astype(np.float32)).reshape(-1)


def _dequant_q8_k(blocks: np.ndarray) -> np.ndarray:  # float32 d, int8 qs[256], int16 bsums[16]
    d = blocks[:, 0:4].copy().view("<f4")
    return (d * blocks[:, 4:260].view(np.int8).astype(np.float32)).reshape(-1)


def _dequant_q1_0(blocks: np.ndarray) -> np.ndarray:  # fp16 d, bit j of element j: 1 -> +d, 0 -> -d
    d = _f16(blocks[:, 0:2])
    bits = np.unpackbits(blocks[:, 2:], axis=1, bitorder="little").astype(np.float32)
    return (d * (2.0 * bits - 1.0)).astype(np.float32).reshape(-1)


_OWN_BLOCK_TYPES = {
    "Q8_1": (32, 36, _dequant_q8_1),
    "Q8_K": (256, 292, _dequant_q8_k),
    "Q1_0": (128, 18, _dequant_q1_0),
}


def supported_types() -> list[str]:
    gguf_types = [t.name for t in gq._type_traits]  # the types gguf-py can dequantize
    return sorted(set(gguf_types) | set(_PLAIN) | set(_OWN_BLOCK_TYPES) | {"I2_S"})


def dequantize(raw: np.ndarray, type_name: str, n_elements: int) -> np.ndarray:
    """float32 values (flat, file order: ggml ne[0] fastest) of a tensor's raw bytes."""
    raw = np.asarray(raw, dtype=np.uint8).reshape(-1)
    if type_name in REFUSED_TYPES:
        raise QuantError(f"cannot dequantize {type_name}: {REFUSED_TYPES[type_name]}")
    if type_name == "I2_S":
        t, scale = unpack_i2s(raw, n_elements)
        return t.astype(np.float32) * scale
    if type_name in _PLAIN:
        dt = np.dtype(_PLAIN[type_name])
        return _expect(raw, n_elements * dt.itemsize, type_name).copy().view(dt).astype(np.float32)
    if type_name in _OWN_BLOCK_TYPES:
        blk, size, fn = _OWN_BLOCK_TYPES[type_name]
        if n_elements % blk:
            raise QuantError(f"{type_name} needs a multiple of {blk} elements, got {n_elements}")
        return fn(_expect(raw, n_elements // blk * size, type_name).reshape(-1, size))
    try:
        qtype = GGMLQuantizationType[type_name]
    except KeyError:
        known = ", ".join(supported_types())
        raise QuantError(f"unknown tensor type {type_name!r}; supported: {known}") from None
    if qtype not in gq._type_traits:
        raise QuantError(f"gguf-py cannot dequantize {type_name}; supported: {', '.join(supported_types())}")
    blk, size = gq.GGML_QUANT_SIZES[qtype]
    if n_elements % blk:
        raise QuantError(f"{type_name} needs a multiple of {blk} elements, got {n_elements}")
    out = gq.dequantize(_expect(raw, n_elements // blk * size, type_name), qtype)
    return np.asarray(out, dtype=np.float32).reshape(-1)


def _expect(raw: np.ndarray, nbytes: int, type_name: str) -> np.ndarray:
    if raw.size < nbytes:
        raise QuantError(f"{type_name} tensor needs {nbytes} bytes, got {raw.size} (truncated?)")
    return raw[:nbytes]
