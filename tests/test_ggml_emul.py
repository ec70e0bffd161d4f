"""parity_both.reference.ggml_emul against (1) slow per-block transcriptions of ggml's C code and (2) real
llama.cpp: one matmul per weight type captured from a fixture's graph with cb_eval, recomputed from
llama.cpp's OWN input tensor (teacher-forced per op)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gq

from parity_both.fixtures import default_vocab_gguf, write_fixture
from parity_both.gguf.quants import pack_i2s
from parity_both.gguf.reader import read_gguf
from parity_both.reference import ggml_emul

from conftest import llama_cpp_model

F32 = np.float32


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a.astype(np.float64) - b) ** 2).sum() / (b.astype(np.float64) ** 2).sum()))


def f16(b: bytes) -> F32:
    return F32(np.frombuffer(b, "<f2")[0])


# --- slow transcriptions of the C code (scalar, one block at a time) ----------------------------
def slow_q8_0(x: np.ndarray) -> list[tuple[F32, list[int], F32]]:
    """arch/x86/quants.c quantize_row_q8_0 (+ Q8_1's s): [(d as stored, qs, s as stored)] per block."""
    out = []
    for b in range(len(x) // 32):
        v = x[b * 32 : (b + 1) * 32]
        amax = F32(0)
        for e in v:
            amax = max(amax, abs(e))
        d = F32(amax / F32(127))
        inv = F32(F32(127) / amax) if amax != 0 else F32(0)
        qs = [int(np.rint(F32(e * inv))) for e in v]  # _mm256_round_ps(_MM_ROUND_NEAREST)
        s = F32(d * F32(sum(qs)))
        out.append((F32(np.float16(d)), qs, F32(np.float16(s))))
    return out


def nearest_int(f: F32) -> int:
    """ggml-quants.c nearest_int: add 1.5 * 2^23 in float32, read the mantissa bits."""
    val = np.array([F32(f) + F32(12582912.0)], np.float32)
    return int((val.view(np.int32)[0] & 0x007FFFFF) - 0x00400000)


def slow_q8_k(x: np.ndarray) -> list[tuple[F32, list[int]]]:
    """ggml-quants.c quantize_row_q8_K_ref."""
    out = []
    for b in range(len(x) // 256):
        v = x[b * 256 : (b + 1) * 256]
        vmax, amax = F32(0), F32(0)
        for e in v:
            if abs(e) > amax:
                amax, vmax = abs(e), e
        if amax == 0:
            out.append((F32(0), [0] * 256))
            continue
        iscale = F32(F32(-127.0) / vmax)
        out.append((F32(F32(1) / iscale), [min(127, nearest_int(F32(iscale * e))) for e in v]))
    return out


def slow_row(x: np.ndarray, w_row: bytes, type_name: str) -> float:
    """ggml-cpu/quants.c ggml_vec_dot_<type>_<partner>_generic for one weight row."""
    sumf = F32(0)
    if type_name in ("Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1"):
        size = {"Q8_0": 34, "Q4_0": 18, "Q5_0": 22, "Q4_1": 20, "Q5_1": 24}[type_name]
        for ib, (dy, qy, sy) in enumerate(slow_q8_0(x)):
            blk = w_row[ib * size : (ib + 1) * size]
            dx = f16(blk[0:2])
            if type_name == "Q8_0":
                qx = np.frombuffer(blk[2:], np.int8).tolist()
                sumf += F32(sum(a * b for a, b in zip(qx, qy, strict=True))) * F32(dx * dy)
                continue
            qs = blk[-16:]
            qh = (
                int.from_bytes(blk[4:8] if type_name == "Q5_1" else blk[2:6], "little")
                if type_name in ("Q5_0", "Q5_1")
                else 0
            )
            sumi = 0
            for j in range(16):
                x0, x1 = qs[j] & 0x0F, qs[j] >> 4
                if type_name in ("Q5_0", "Q5_1"):
                    x0 |= ((qh >> j) & 1) << 4
                    x1 |= ((qh >> (j + 16)) & 1) << 4
                off = {"Q4_0": 8, "Q5_0": 16}.get(type_name, 0)
                sumi += (x0 - off) * qy[j] + (x1 - off) * qy[j + 16]
            if type_name in ("Q4_0", "Q5_0"):
                sumf += F32(F32(sumi) * dx) * dy
            else:
                m = f16(blk[2:4])
                sumf += F32(F32(dx * dy) * F32(sumi)) + F32(m * sy)
        return float(sumf)
    if type_name in ("TQ1_0", "TQ2_0"):
        pow3 = [1, 3, 9, 27, 81, 243]
        for ib, (dy, qy) in enumerate(slow_q8_k(x)):
            if type_name == "TQ2_0":
                blk = w_row[ib * 66 : (ib + 1) * 66]
                sumi = 0
                for j in (0, 32):
                    for lane in range(4):
                        for k in range(32):
                            sumi += qy[j * 4 + lane * 32 + k] * (((blk[j + k] >> (lane * 2)) & 3) - 1)
                dx = f16(blk[64:66])
            else:
                blk = w_row[ib * 54 : (ib + 1) * 54]
                qs, qh, sumi = blk[0:48], blk[48:52], 0
                for lane in range(5):
                    for m in range(32):
                        xi = (((qs[m] * pow3[lane]) & 0xFF) * 3) >> 8
                        sumi += (xi - 1) * qy[lane * 32 + m]
                for lane in range(5):
                    for m in range(16):
                        xi = (((qs[32 + m] * pow3[lane]) & 0xFF) * 3) >> 8
                        sumi += (xi - 1) * qy[160 + lane * 16 + m]
                for lane in range(4):
                    for j in range(4):
                        xi = (((qh[j] * pow3[lane]) & 0xFF) * 3) >> 8
                        sumi += (xi - 1) * qy[240 + lane * 4 + j]
                dx = f16(blk[52:54])
            sumf += F32(sumi) * F32(dy * dx)
        return float(sumf)
    raise AssertionError(type_name)


def slow_i2s(x: np.ndarray, t: np.ndarray, scale: float) -> float:
    """BitNet.cpp I2_S per the notes: s = 127/max(max|x|, 1e-5); q = clip(rint(x*s)); (sum t*q)/s*scale."""
    amax = max(1e-5, max(abs(float(e)) for e in x))
    s = F32(127.0 / amax)
    q = [int(min(127, max(-128, np.rint(F32(e * s))))) for e in x]
    isum = sum(int(a) * b for a, b in zip(t, q, strict=True))
    return float(F32(F32(isum) / s) * F32(scale))


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "TQ1_0", "TQ2_0"])
def test_ggml_linear_equals_slow_c_transcription(type_name: str) -> None:
    rng = np.random.default_rng(3)
    rows, cols = 6, 512
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(F32)
    if type_name.startswith("TQ"):
        w = (rng.integers(-1, 2, (rows, cols)) * 0.04).astype(F32)
    raw = np.asarray(gq.quantize(w, GGMLQuantizationType[type_name])).view(np.uint8).reshape(-1)
    x = rng.standard_normal((3, cols)).astype(F32)
    x[1, 5] = 7.5  # an outlier: one block's scale is set by it
    x[2, :256] = 0  # an all-zero block (d = 0)
    got = ggml_emul.ggml_linear(x, raw, type_name, rows, cols)
    rb = raw.size // rows
    slow = np.array(
        [[slow_row(x[t], raw[r * rb : (r + 1) * rb].tobytes(), type_name) for r in range(rows)] for t in range(3)], F32
    )
    exact = ggml_emul.exact_linear(x, raw, type_name, rows, cols)
    # same arithmetic but the float32 summation order: agreement at float32 rounding level
    np.testing.assert_allclose(got, slow, rtol=2e-6, atol=2e-6 * float(np.abs(slow).max()))
    # ... and clearly not the float matmul: activation quantization is a ~1e-3..1e-2 effect
    assert 1e-4 < rel_err(got, exact) < 5e-2


def test_activation_quantizers_match_c_transcription() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 512)).astype(F32)
    x[0, 3] = -9.0  # negative extreme: Q8_K takes the SIGNED value of the first max |x|
    x[1, 300] = 4.0
    x[1, 301] = -4.0  # tie in |x|: the first one wins (strict '>')
    q, d = ggml_emul.quantize_q8_0(x)
    q1, d1, s1 = ggml_emul.quantize_q8_1(x)
    qk, dk = ggml_emul.quantize_q8_k(x)
    for t in range(2):
        for ib, (ds, qs, ss) in enumerate(slow_q8_0(x[t])):
            assert q[t, ib].tolist() == qs and d[t, ib] == ds
            assert q1[t, ib].tolist() == qs and d1[t, ib] == ds and s1[t, ib] == ss
        for ib, (ds, qs) in enumerate(slow_q8_k(x[t])):
            assert qk[t, ib].tolist() == qs and dk[t, ib] == ds


def test_round_half_even_not_away_from_zero() -> None:
    # 127/amax = 1 here, so 0.5 and 2.5 are exact ties: x86 rounds to even (0, 2), the scalar
    # reference quantize_row_q8_0_ref would give 1 and 3.
    x = np.zeros((1, 32), F32)
    x[0, :3] = [127.0, 0.5, 2.5]
    q, _ = ggml_emul.quantize_q8_0(x)
    assert q[0, 0, :3].tolist() == [127, 0, 2]


def test_i2s_linear_equals_notes_formula() -> None:
    rng = np.random.default_rng(5)
    rows, cols = 5, 256
    t = rng.integers(-1, 2, (rows, cols)).astype(np.int8)
    raw = np.frombuffer(pack_i2s(t, 0.0317), np.uint8)
    x = rng.standard_normal((2, cols)).astype(F32)
    got = ggml_emul.ggml_linear(x, raw, "I2_S", rows, cols)
    slow = np.array([[slow_i2s(x[i], t[r], 0.0317) for r in range(rows)] for i in range(2)], F32)
    np.testing.assert_array_equal(got, slow)  # same float32 operations, same order: bit-exact
    assert 1e-4 < rel_err(got, ggml_emul.exact_linear(x, raw, "I2_S", rows, cols)) < 5e-2


def test_float_weights() -> None:
    rng = np.random.default_rng(6)
    w = rng.standard_normal((4, 64)).astype(F32)
    x = (rng.standard_normal((2, 64)) * 3).astype(F32)
    y32 = ggml_emul.ggml_linear(x, w.view(np.uint8).reshape(-1), "F32", 4, 64)
    np.testing.assert_allclose(y32, x @ w.T, rtol=1e-5)
    w16 = w.astype(np.float16)
    y16 = ggml_emul.ggml_linear(x, w16.view(np.uint8).reshape(-1), "F16", 4, 64)
    expect = (x.astype(np.float16).astype(np.float64) @ w16.astype(np.float64).T).astype(F32)
    np.testing.assert_array_equal(y16, expect)
    assert ggml_emul.vec_dot_type("Q4_K") == "Q8_K" and ggml_emul.vec_dot_type("Q5_1") == "Q8_1"
    with pytest.raises(ValueError, match="no ggml matmul emulation"):
        ggml_emul.ggml_linear(x, w.view(np.uint8).reshape(-1), "I32", 4, 64)


# --- against real llama.cpp -------------------------------------------------------------------
class GgmlTensor(ctypes.Structure):
    """struct ggml_tensor of llama-cpp-python 0.3.36's ggml.h (GGML_MAX_DIMS 4, MAX_SRC 10, NAME 64)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


Node = tuple[str, str, list[int], "np.ndarray | None"]


def capture_sequence(path: Path, tokens: list[int], want: Any = None) -> list[Node]:
    """Evaluate `tokens` in one batch with llama-cpp-python (conftest's parity settings) and return every
    graph node llama.cpp evaluates (cb_eval) whose name `want` accepts (default: all), in order:
    (name, ggml_op_desc, ne, flat float32 data if the node is F32 and contiguous, else None)."""
    lib = llama_cpp.llama_cpp
    base = ctypes.CDLL(os.path.join(os.path.dirname(lib.__file__), "lib", "libggml-base.so"))
    get = base.ggml_backend_tensor_get
    get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    get.restype = None
    base.ggml_op_desc.argtypes = [ctypes.c_void_p]
    base.ggml_op_desc.restype = ctypes.c_char_p
    base.ggml_is_contiguous.argtypes = [ctypes.c_void_p]
    base.ggml_is_contiguous.restype = ctypes.c_bool
    seq: list[Node] = []

    def on_tensor(ptr: int, ask: bool, _user: int) -> bool:
        t = ctypes.cast(ptr, ctypes.POINTER(GgmlTensor)).contents
        name, ne = t.name.decode(), [int(t.ne[i]) for i in range(4)]
        if ask:
            return want is None or bool(want(name))
        data = None
        if t.type == 0 and base.ggml_is_contiguous(ptr):  # F32
            data = np.empty(int(np.prod(ne)), F32)
            get(ptr, data.ctypes.data, 0, data.nbytes)
        seq.append((name, base.ggml_op_desc(ptr).decode(), ne, data))
        return True

    cb = lib.ggml_backend_sched_eval_callback(on_tensor)
    orig_ctx = lib.llama_context_default_params

    def ctx_params() -> Any:
        p = orig_ctx()
        p.cb_eval, p.cb_eval_user_data = cb, None
        return p

    lib.llama_context_default_params = ctx_params
    try:
        llm = llama_cpp_model(path, n_ctx=64)
    finally:
        lib.llama_context_default_params = orig_ctx
    llm.reset()
    llm.eval(tokens)
    llm.close()
    return seq


def capture_llama(path: Path, tokens: list[int], names: set[str]) -> dict[str, np.ndarray]:
    """The named F32 graph tensors of one batch (flat; the last node of each name)."""
    return {n: d for n, _, _, d in capture_sequence(path, tokens, names.__contains__) if d is not None}


TOKENS = [19556, 905, 28, 451, 314, 253, 1028, 30, 12, 99, 1000, 4000]
LLAMA_OPS = [
    ("attn_norm-0", "blk.0.attn_v.weight", "Vcur-0"),
    ("ffn_norm-0", "blk.0.ffn_up.weight", "ffn_up-0"),
    ("ffn_swiglu-0", "blk.0.ffn_down.weight", "ffn_out-0"),
    ("result_norm", "token_embd.weight", "result_output"),
]
BITNET_OPS = [
    ("attn_norm-0", "blk.0.attn_v.weight", "Vcur-0"),
    ("attn_sub_norm-0", "blk.0.attn_output.weight", "attn_out-0"),
    ("ffn_sub_norm-0", "blk.0.ffn_down.weight", "ffn_down-0"),
    ("result_norm", "token_embd.weight", "result_output"),
]


@pytest.mark.parametrize(
    ("arch", "weight_type"),
    [
        ("llama", "F16"),
        ("llama", "Q8_0"),
        ("llama", "Q4_0"),
        ("llama", "Q4_1"),
        ("bitnet", "TQ1_0"),
        ("bitnet", "TQ2_0"),
    ],
)
def test_ggml_linear_matches_llama_cpp(tmp_path: Path, arch: str, weight_type: str) -> None:
    path = tmp_path / f"{arch}_{weight_type}.gguf"
    write_fixture(path, arch=arch, weight_type=weight_type, size="tiny", seed=11)
    ops = LLAMA_OPS if arch == "llama" else BITNET_OPS
    got = capture_llama(path, TOKENS, {n for a, _, o in ops for n in (a, o)})
    g = read_gguf(path)
    for inp, weight, out in ops:
        assert inp in got and out in got, f"llama.cpp did not report {inp} / {out}: {sorted(got)}"
        t = g.tensors[weight]
        rows, cols = t.rows_cols
        x = got[inp].reshape(len(TOKENS), cols)
        ref = got[out].reshape(len(TOKENS), rows)
        emul = ggml_emul.ggml_linear(x, g.raw(weight), t.type_name, rows, cols)
        exact = ggml_emul.exact_linear(x, g.raw(weight), t.type_name, rows, cols)
        e_emul, e_exact = rel_err(emul, ref), rel_err(exact, ref)
        # measured: emulation 6e-8..1.5e-7 (float32 summation order), exact 2e-4 (F16) .. 1.5e-2
        assert e_emul < 1e-6, (weight, out, e_emul)
        assert e_exact > 50 * e_emul, (weight, out, e_exact, e_emul)


def test_ggml_linear_matches_llama_cpp_on_smollm2() -> None:
    """The real embedded model: Q4_1 layers (Q8_1 activations) and a Q8_0 tied LM head, d = 576."""
    path = default_vocab_gguf()
    got = capture_llama(path, TOKENS, {n for a, _, o in LLAMA_OPS for n in (a, o)})
    g = read_gguf(path)
    for inp, weight, out in LLAMA_OPS:
        t = g.tensors[weight]
        rows, cols = t.rows_cols
        x = got[inp].reshape(len(TOKENS), cols)
        ref = got[out].reshape(len(TOKENS), rows)
        e_emul = rel_err(ggml_emul.ggml_linear(x, g.raw(weight), t.type_name, rows, cols), ref)
        e_exact = rel_err(ggml_emul.exact_linear(x, g.raw(weight), t.type_name, rows, cols), ref)
        # measured: emulation 1.3e-7..3.1e-7, exact 5.6e-3..1.4e-2 (NMSE = square: 1e-13 vs 1e-4)
        assert e_emul < 1e-6 and e_exact > 1e-3, (weight, e_emul, e_exact)
