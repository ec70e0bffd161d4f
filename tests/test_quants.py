"""parity_both.gguf.quants: dequantization entry point and BitNet.cpp's I2_S layout.

The I2_S checks use bytes written by an independent per-element packer written here from the
layout description (formats-and-graphs.md), never by quants.pack_i2s.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gq

from parity_both.gguf import quants
from parity_both.gguf.quants import QuantError


def independent_i2s(values: list[int], scale: float) -> bytes:
    """I2_S straight from the layout: element j of each 128-block -> byte j % 32, shift 6 - 2*(j // 32),
    code = value + 1; then the float32 scale and 28 bytes of padding (n/4 + 32 bytes)."""
    n = len(values)
    out = bytearray(n // 4 + 32)
    for i, v in enumerate(values):
        block, j = divmod(i, 128)
        out[block * 32 + j % 32] |= (v + 1) << (6 - 2 * (j // 32))
    out[n // 4 : n // 4 + 4] = struct.pack("<f", scale)
    return bytes(out)


def test_i2s_hand_built_bytes() -> None:
    # all zeros is code 1 everywhere: 0b01_01_01_01
    raw = bytearray([0x55] * 64) + bytearray(struct.pack("<f", 0.5)) + bytearray(28)
    raw[0] = 0b10_01_01_00  # element 0 -> +1 (shift 6), element 96 -> -1 (shift 0)
    raw[32 + 7] = 0b01_10_01_01  # second block, element 32 + 7 -> +1 (shift 4)
    w = quants.dequantize(np.frombuffer(bytes(raw), np.uint8), "I2_S", 256)
    expect = np.zeros(256, np.float32)
    expect[0], expect[96], expect[128 + 39] = 0.5, -0.5, 0.5
    np.testing.assert_array_equal(w, expect)


def test_i2s_reader_against_independent_packer() -> None:
    rng = np.random.default_rng(7)
    t = rng.integers(-1, 2, size=3 * 256).tolist()
    raw = np.frombuffer(independent_i2s(t, 0.0371), np.uint8)
    assert raw.size == 3 * 256 // 4 + 32
    values, scale = quants.unpack_i2s(raw, len(t))
    assert scale == np.float32(0.0371)
    np.testing.assert_array_equal(values, np.array(t, np.int8))
    w = quants.dequantize(raw, "I2_S", len(t))
    np.testing.assert_array_equal(w, np.array(t, np.float32) * np.float32(0.0371))


def test_pack_i2s_matches_independent_packer() -> None:
    rng = np.random.default_rng(8)
    t = rng.integers(-1, 2, size=(4, 384)).astype(np.int8)
    assert quants.pack_i2s(t, 1.25) == independent_i2s(t.reshape(-1).tolist(), 1.25)


def test_i2s_code_3_reads_as_zero_and_bad_sizes_refused() -> None:
    raw = np.full(128 // 4 + 32, 0xFF, np.uint8)  # every code 3 (never written by BitNet.cpp)
    raw[32:36] = np.frombuffer(struct.pack("<f", 2.0), np.uint8)
    assert not quants.dequantize(raw, "I2_S", 128).any()
    with pytest.raises(QuantError, match="multiple of 128"):
        quants.dequantize(raw, "I2_S", 100)
    with pytest.raises(QuantError, match="needs"):
        quants.dequantize(raw[:20], "I2_S", 128)
    with pytest.raises(QuantError, match="ternary"):
        quants.pack_i2s(np.full((1, 128), 2), 1.0)


@pytest.mark.parametrize("scale", [0.0123456, 0.5, 3.3e-3, 0.07])
def test_i2s_to_tq2_0_then_gguf_dequantize(scale: float) -> None:
    rng = np.random.default_rng(9)
    t = rng.integers(-1, 2, size=4 * 512).tolist()
    raw = np.frombuffer(independent_i2s(t, scale), np.uint8)
    tq, rel = quants.i2s_to_tq2_0(raw, len(t))
    via_tq2 = gq.dequantize(np.frombuffer(tq, np.uint8), GGMLQuantizationType.TQ2_0).reshape(-1)
    direct = quants.dequantize(raw, "I2_S", len(t))
    s32, s16 = np.float32(scale), np.float16(scale)
    assert rel == pytest.approx(abs(float(s16) - float(s32)) / float(s32), rel=1e-12)
    assert rel <= 2.0**-11  # fp16 has an 11-bit significand
    np.testing.assert_array_equal(np.sign(via_tq2), np.sign(direct))  # codes moved bit for bit
    np.testing.assert_array_equal(via_tq2, np.array(t, np.float32) * np.float32(s16))
    np.testing.assert_allclose(via_tq2, direct, rtol=2.0**-11, atol=0)


# --- independent per-element decoders, written from ggml's dequantize_row_* (ggml-quants.c) ------------
def _h(b: bytes) -> float:
    return float(np.frombuffer(b, "<f2")[0])


def _dec_q4_0(blk: bytes) -> list[float]:
    d, qs = _h(blk[:2]), blk[2:18]
    return [((q & 0xF) - 8) * d for q in qs] + [((q >> 4) - 8) * d for q in qs]


def _dec_q4_1(blk: bytes) -> list[float]:
    d, m, qs = _h(blk[:2]), _h(blk[2:4]), blk[4:20]
    return [np.float32((q & 0xF) * d) + np.float32(m) for q in qs] + [
        np.float32((q >> 4) * d) + np.float32(m) for q in qs
    ]


def _q5(qh: int, qs: bytes) -> list[int]:
    lo = [(q & 0xF) | (((qh >> j) << 4) & 0x10) for j, q in enumerate(qs)]
    hi = [(q >> 4) | ((qh >> (j + 12)) & 0x10) for j, q in enumerate(qs)]
    return lo + hi


def _dec_q5_0(blk: bytes) -> list[float]:
    d, qh = _h(blk[:2]), struct.unpack("<I", blk[2:6])[0]
    return [(q - 16) * d for q in _q5(qh, blk[6:22])]


def _dec_q5_1(blk: bytes) -> list[float]:
    d, m, qh = _h(blk[:2]), _h(blk[2:4]), struct.unpack("<I", blk[4:8])[0]
    return [np.float32(q * d) + np.float32(m) for q in _q5(qh, blk[8:24])]


def _dec_q8_0(blk: bytes) -> list[float]:
    d = _h(blk[:2])
    return [q * d for q in struct.unpack("<32b", blk[2:34])]


def _dec_tq2_0(blk: bytes) -> list[float]:
    qs, d = blk[:64], _h(blk[64:66])
    return [(((qs[j + m] >> (2 * sh)) & 3) - 1) * d for j in (0, 32) for sh in range(4) for m in range(32)]


def _dec_bf16(blk: bytes) -> list[float]:
    return [struct.unpack("<f", b"\0\0" + blk[i : i + 2])[0] for i in range(0, len(blk), 2)]


# name -> (block elements, block bytes, byte offsets of fp16 scales to make finite, decoder)
INDEPENDENT = {
    "Q4_0": (32, 18, (0,), _dec_q4_0),
    "Q4_1": (32, 20, (0, 2), _dec_q4_1),
    "Q5_0": (32, 22, (0,), _dec_q5_0),
    "Q5_1": (32, 24, (0, 2), _dec_q5_1),
    "Q8_0": (32, 34, (0,), _dec_q8_0),
    "TQ2_0": (256, 66, (64,), _dec_tq2_0),
    "BF16": (1, 2, (), _dec_bf16),
    "F16": (1, 2, (), lambda b: [_h(b)]),
    "F32": (1, 4, (), lambda b: list(struct.unpack("<f", b))),
}


@pytest.mark.parametrize("name", sorted(INDEPENDENT))
def test_block_types_against_independent_decoders(name: str) -> None:
    blk, size, scales, decode = INDEPENDENT[name]
    rng = np.random.default_rng(11)
    n_blocks = max(3, 96 // blk)
    raw = bytearray(rng.integers(0, 256, size=n_blocks * size, dtype=np.uint8).tobytes())
    for b in range(n_blocks):  # finite scales; for the plain float types, finite values
        for off in scales:
            raw[b * size + off : b * size + off + 2] = np.float16(rng.uniform(-2, 2)).tobytes()
        if name in ("F16", "BF16"):
            raw[b * size + 1] &= 0x3F  # exponent well below inf/nan
        if name == "F32":
            raw[b * size + 3] &= 0x3F
    expect = [v for b in range(n_blocks) for v in decode(bytes(raw[b * size : (b + 1) * size]))]
    got = quants.dequantize(np.frombuffer(bytes(raw), np.uint8), name, n_blocks * blk)
    assert got.dtype == np.float32 and got.shape == (n_blocks * blk,)
    np.testing.assert_array_equal(got, np.array(expect, np.float32))


def test_tq1_0_and_mxfp4_exactly_representable_values_round_trip() -> None:
    """Values the format holds exactly (ternary x fp16 scale; e2m1 x power of two) come back unchanged:
    the expectation is the input, not a dequantizer."""
    rng = np.random.default_rng(12)
    t = rng.integers(-1, 2, size=(2, 256)).astype(np.float32)
    t[:, 0] = 1
    x = t * np.float32(np.float16(0.0371))
    raw = np.asarray(gq.quantize(x, GGMLQuantizationType.TQ1_0)).view(np.uint8).reshape(-1)
    np.testing.assert_array_equal(quants.dequantize(raw, "TQ1_0", x.size), x.reshape(-1))
    e2m1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)
    y = rng.choice(np.concatenate([e2m1, -e2m1]), size=(2, 64)).astype(np.float32)
    y[:, 0], y[:, 32] = 6, -6
    y *= np.float32(0.25)
    raw = np.asarray(gq.quantize(y, GGMLQuantizationType.MXFP4)).view(np.uint8).reshape(-1)
    np.testing.assert_array_equal(quants.dequantize(raw, "MXFP4", y.size), y.reshape(-1))


def test_q8_1_q8_k_q1_0_from_hand_built_blocks() -> None:
    # Q8_1: fp16 d, fp16 s, int8 qs[32] -> d * q
    q = np.arange(-16, 16, dtype=np.int8)
    blk = np.float16(0.25).tobytes() + np.float16(99.0).tobytes() + q.tobytes()
    np.testing.assert_array_equal(quants.dequantize(np.frombuffer(blk, np.uint8), "Q8_1", 32), q * 0.25)
    # Q8_K: float32 d, int8 qs[256], int16 bsums[16] -> d * q
    qk = (np.arange(256) % 255 - 127).astype(np.int8)
    blk = np.float32(0.01).tobytes() + qk.tobytes() + np.zeros(16, np.int16).tobytes()
    got = quants.dequantize(np.frombuffer(blk, np.uint8), "Q8_K", 256)
    np.testing.assert_array_equal(got, np.float32(0.01) * qk.astype(np.float32))
    # Q1_0 (mainline id 41): fp16 d, bit j (LSB first) of element j: 1 -> +d, 0 -> -d
    bits = bytes([0b00000101] + [0] * 15)
    got = quants.dequantize(np.frombuffer(np.float16(2.0).tobytes() + bits, np.uint8), "Q1_0", 128)
    expect = np.full(128, -2.0, np.float32)
    expect[[0, 2]] = 2.0
    np.testing.assert_array_equal(got, expect)


def test_plain_types_and_truncation() -> None:
    v = np.array([1, -2, 3, 40000], np.int32)
    np.testing.assert_array_equal(quants.dequantize(v.view(np.uint8), "I32", 4), v.astype(np.float32))
    with pytest.raises(QuantError, match="truncated"):
        quants.dequantize(np.zeros(10, np.uint8), "F32", 4)
    with pytest.raises(QuantError, match="multiple of 32"):
        quants.dequantize(np.zeros(18, np.uint8), "Q4_0", 16)


@pytest.mark.parametrize("name", ["TL1", "TL2", "I8_S"])
def test_bitnet_lut_types_refused(name: str) -> None:
    with pytest.raises(QuantError, match=name):
        quants.dequantize(np.zeros(64, np.uint8), name, 128)


def test_unknown_type_refused() -> None:
    with pytest.raises(QuantError, match="unknown tensor type 'Q9_9'"):
        quants.dequantize(np.zeros(64, np.uint8), "Q9_9", 128)
