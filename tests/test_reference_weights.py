"""Dequantization fast paths and the prepared-weights cache of the NumPy reference."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gq

from parity_both.config import embedded_model_path
from parity_both.gguf.reader import read_gguf
from parity_both.reference.dequant import FAST_DEQUANT, bf16_to_f32, dequantize, dequantize_rows, f16_to_f32
from parity_both.reference.prepared import PreparedCache, load_manifest, prepare_weights
from parity_both.reference.weights import WeightStore


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def gguf_deq(raw: np.ndarray, type_name: str) -> np.ndarray:
    return np.asarray(gq.dequantize(raw, GGMLQuantizationType[type_name]), dtype=np.float32).reshape(-1)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0", "F16", "BF16", "TQ2_0"])
def test_fast_dequant_bit_exact_on_quantized_random_data(type_name: str) -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((64, 256)) * rng.uniform(0.01, 10, (64, 1))).astype(np.float32)
    if type_name == "TQ2_0":
        x = np.sign(x) * (np.abs(x) > 0.5) * rng.uniform(0.01, 10, (64, 1)).astype(np.float32)
    raw = np.asarray(gq.quantize(x, GGMLQuantizationType[type_name])).view(np.uint8).reshape(-1)
    assert np.array_equal(bits(dequantize(raw, type_name, x.size)), bits(gguf_deq(raw, type_name)))


@pytest.mark.parametrize(
    "type_name,block_bytes",
    [("Q4_0", 18), ("Q4_1", 20), ("Q8_0", 34), ("F16", 2), ("BF16", 2), ("F32", 4), ("TQ2_0", 66)],
)
def test_fast_dequant_bit_exact_on_random_bytes(type_name: str, block_bytes: int) -> None:
    """Arbitrary bit patterns, scales included (inf/nan/subnormal fp16 scales too)."""
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, 4096 * block_bytes, dtype=np.uint8)
    n = raw.size // block_bytes * {"Q": 32, "T": 256}.get(type_name[0], 1)
    with np.errstate(invalid="ignore", over="ignore"):
        ours, theirs = dequantize(raw, type_name, n), gguf_deq(raw, type_name)
    assert ours.shape == theirs.shape == (n,)
    assert np.array_equal(bits(ours), bits(theirs))


@pytest.mark.parametrize(("type_name", "convert"), [("F16", f16_to_f32), ("BF16", bf16_to_f32)])
def test_float_conversion_is_astype_on_every_bit_pattern(
    type_name: str, convert: Callable[..., np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """All 65536 16-bit patterns (subnormals, +-0, inf, NaN payloads), across conversion blocks and into
    a caller's buffer, give NumPy's own conversion bit for bit. Blocks of 1024 values: most hold no inf or
    NaN and take the bit-shift path, the few that do are redone by astype."""
    from parity_both.reference import dequant

    monkeypatch.setattr(dequant, "_FLOAT_BLOCK", 1024)
    patterns = np.tile(np.arange(1 << 16, dtype=np.uint16), 3)[6:]  # blocks of 65536 not aligned to values
    if type_name == "F16":
        expected = patterns.view(np.float16).astype(np.float32)
    else:
        expected = (patterns.astype(np.uint32) << 16).view(np.float32)
    out = np.full((patterns.size // 7, 7), np.nan, dtype=np.float32)
    got = convert(patterns.view(np.uint8), out)
    assert got is out
    assert np.array_equal(bits(got).reshape(-1), bits(expected))
    assert np.array_equal(bits(convert(patterns.view(np.uint8))), bits(expected))


def test_fast_dequant_bit_exact_on_embedded_model_path() -> None:
    g = read_gguf(embedded_model_path())
    names = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{n}.weight" for i in (0, 17, 29) for n in ("attn_q", "attn_k", "ffn_down", "ffn_gate")
    ]
    seen = set()
    for name in names:
        t = g.tensors[name]
        seen.add(t.type_name)
        raw = g.raw(name)
        assert t.type_name in FAST_DEQUANT
        ours = dequantize(raw, t.type_name, t.n_elements)
        assert np.array_equal(bits(ours), bits(gguf_deq(raw, t.type_name)))
        g.release(name)
    assert seen == {"Q8_0", "Q4_1", "F32"}


def test_i2_s_fast_path_matches_parity_both_quants() -> None:
    from parity_both.gguf import quants

    rng = np.random.default_rng(4)
    n = 128 * 96
    packed = rng.integers(0, 256, n // 4, dtype=np.uint8)  # includes the never-written code 3
    raw = np.concatenate([packed, np.frombuffer(np.float32(0.0371).tobytes(), np.uint8), np.zeros(28, np.uint8)])
    ours = dequantize(raw, "I2_S", n)
    assert np.array_equal(bits(ours), bits(quants.dequantize(raw, "I2_S", n)))
    t = np.sign(rng.standard_normal(n)).astype(np.int8) * (rng.random(n) > 0.3)
    raw2 = np.frombuffer(quants.pack_i2s(t, 0.5), dtype=np.uint8)
    np.testing.assert_array_equal(dequantize(raw2, "I2_S", n), t.astype(np.float32) * np.float32(0.5))


def pack_q5(codes: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> bytes:
    """Q5_0 / Q5_1 blocks from 5-bit codes [n, 32] by the ggml layout: fp16 d (, fp16 m), u32 qh with
    bit j = bit 4 of element j, then 16 bytes: element j in the low nibble, j + 16 in the high one."""
    out = bytearray()
    for b, c in enumerate(codes.tolist()):
        qh = sum(((c[j] >> 4) & 1) << j for j in range(32))
        qs = bytes((c[j] & 15) | ((c[j + 16] & 15) << 4) for j in range(16))
        out += np.float16(d[b]).tobytes() + (b"" if m is None else np.float16(m[b]).tobytes())
        out += qh.to_bytes(4, "little") + qs
    return bytes(out)


def generic_case(type_name: str) -> tuple[bytes, np.ndarray]:
    """Raw bytes of a 48 x 256 matrix and its values, computed from the format, not by a dequantizer."""
    rng = np.random.default_rng(3)
    if type_name == "TQ1_0":  # ternary t * s, each 256-block holding a +-s: TQ1_0 stores it exactly
        t = rng.integers(-1, 2, (48, 256)).astype(np.float32)
        t[:, 0] = 1
        s = np.float32(2.0) ** rng.integers(-6, 2, (48, 1)).astype(np.float32)
        x = (t * s).astype(np.float32)
        return np.asarray(gq.quantize(x, GGMLQuantizationType.TQ1_0)).tobytes(), x
    n = 48 * 256 // 32
    codes = rng.integers(0, 32, (n, 32))
    d = rng.uniform(0.01, 2, n).astype(np.float16).astype(np.float32)
    if type_name == "Q5_0":
        return pack_q5(codes, d, None), ((codes - 16) * d[:, None]).astype(np.float32).reshape(48, 256)
    m = rng.uniform(-1, 1, n).astype(np.float16).astype(np.float32)
    x = (codes.astype(np.float32) * d[:, None]) + m[:, None]  # d * q + m in float32, as ggml
    return pack_q5(codes, d, m), x.reshape(48, 256)


@pytest.mark.parametrize("type_name", ["Q5_0", "Q5_1", "TQ1_0"])
def test_generic_types_and_row_ranges(tmp_path: Path, type_name: str) -> None:
    """Types without a fast path (through gguf.quants) give the values the format defines; row
    blocks equal slices of the whole."""
    from parity_both.fixtures import TensorSpec, kv_str, write_gguf

    raw, want = generic_case(type_name)
    path = tmp_path / "m.gguf"
    write_gguf(path, [kv_str("general.architecture", "llama")], [TensorSpec("w", (256, 48), type_name, lambda: raw)])
    g = read_gguf(path)
    t = g.tensors["w"]
    assert type_name not in FAST_DEQUANT
    full = dequantize_rows(g, t, 0, 48)
    assert np.array_equal(bits(full), bits(want))
    assert np.array_equal(bits(dequantize_rows(g, t, 5, 17)), bits(full[5:17]))


def test_prepared_cache_is_exact_deterministic_and_reused(tmp_path: Path) -> None:
    from parity_both.fixtures import write_fixture

    model = tmp_path / "q4_1.gguf"
    write_fixture(model, arch="llama", weight_type="Q4_1")
    m1 = prepare_weights(model, tmp_path / "a")
    m2 = prepare_weights(model, tmp_path / "b")
    assert m1 == m2
    assert (tmp_path / "a" / "weights.bin").read_bytes() == (tmp_path / "b" / "weights.bin").read_bytes()
    assert json.loads((tmp_path / "a" / "manifest.json").read_text()) == m1
    assert m1["model"]["size"] == model.stat().st_size and len(m1["model"]["sha256"]) == 64
    # reuse: a second call does not rewrite
    mtime = (tmp_path / "a" / "weights.bin").stat().st_mtime_ns
    assert prepare_weights(model, tmp_path / "a") == m1
    assert (tmp_path / "a" / "weights.bin").stat().st_mtime_ns == mtime
    # every cached tensor equals the on-the-fly dequantization, bit for bit
    g = read_gguf(model)
    cache = PreparedCache(m1, tmp_path / "a")
    with_cache, without = WeightStore(g, cache), WeightStore(g, None)
    assert set(m1["tensors"]) == {n for n, t in g.tensors.items() if len(t.shape) == 2}
    for name in m1["tensors"]:
        w1, w2 = with_cache.matrix(name), without.matrix(name)
        assert np.array_equal(bits(w1.dense()), bits(w2.dense()))
        w1.release()
    ids = np.array([0, 5, 49151, 7])
    assert np.array_equal(
        with_cache.rows_of("token_embd.weight", ids), without.matrix("token_embd.weight").dense()[ids]
    )
    cache.close()
    # a cache for another model is not used
    other = tmp_path / "other.gguf"
    write_fixture(other, arch="llama", weight_type="Q4_1", seed=1)
    assert load_manifest(other, tmp_path / "a") is None


@pytest.mark.parametrize(("arch", "type_name"), [("llama", "TQ2_0"), ("bitnet", "TQ1_0"), ("bitnet-b1.58", "I2_S")])
def test_prepared_cache_of_a_ternary_model(tmp_path: Path, arch: str, type_name: str) -> None:
    """Ternary matrices are cached as int8 codes + scales (1 byte a weight, not 4) and read back
    as exactly the float32 values the dequantizer gives."""
    from parity_both.fixtures import write_fixture

    model = tmp_path / "ternary.gguf"
    write_fixture(model, arch=arch, weight_type=type_name, embed_type="F16")
    m = prepare_weights(model, tmp_path / "p")
    g = read_gguf(model)
    kinds = {(e["source_type"], e["dtype"]) for e in m["tensors"].values()}
    assert kinds == {(type_name, "|i1")}  # the F16 embedding is read from the GGUF, not copied as float32
    ternary = [g.tensors[n] for n, e in m["tensors"].items() if e["dtype"] == "|i1"]
    assert m["bytes"] < 1.1 * sum(t.rows_cols[0] * t.rows_cols[1] for t in ternary) + (1 << 16)
    cache = PreparedCache(m, tmp_path / "p")
    for name in m["tensors"]:
        t = g.tensors[name]
        rows = t.rows_cols[0]
        assert np.array_equal(bits(cache.rows(name, 0, rows)), bits(dequantize_rows(g, t, 0, rows)))
        assert np.array_equal(bits(cache.rows(name, 3, 7)), bits(dequantize_rows(g, t, 0, rows)[3:7]))
    cache.close()


def test_prepared_cache_budget_streams_what_does_not_fit(tmp_path: Path) -> None:
    """Float32 matrices beyond the disk budget are left out of the cache, and
    the reference reads them from the GGUF: same values either way."""
    from parity_both.fixtures import write_fixture

    model = tmp_path / "q4_0.gguf"
    write_fixture(model, arch="llama", weight_type="Q4_0")
    size = model.stat().st_size
    full = prepare_weights(model, tmp_path / "full", budget_factor=100)
    part = prepare_weights(model, tmp_path / "part", budget_factor=1.0)
    assert full["bytes"] > size and part["bytes"] <= size
    assert set(part["tensors"]) < set(full["tensors"])
    g = read_gguf(model)
    a, b = (
        WeightStore(g, PreparedCache(full, tmp_path / "full")),
        WeightStore(g, PreparedCache(part, tmp_path / "part")),
    )
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    for name in full["tensors"]:
        if g.tensors[name].rows_cols[1] == 64:
            stem = name.removesuffix(".weight")
            assert np.array_equal(bits(a.linear(stem, x)), bits(b.linear(stem, x)))
    a.close()
    b.close()


@pytest.mark.parametrize(("arch", "type_name"), [("bitnet", "TQ2_0"), ("bitnet", "TQ1_0"), ("bitnet-b1.58", "I2_S")])
def test_int8_ternary_cache_gives_the_streamed_logits(tmp_path: Path, arch: str, type_name: str) -> None:
    """The reference on the int8 prepared cache computes the same logits, bit for bit, as on weights
    dequantized straight from the GGUF (no cache), LM head included when it is ternary."""
    from parity_both.fixtures import write_fixture
    from parity_both.reference.engine import run_reference

    model = tmp_path / "m.gguf"
    write_fixture(model, arch=arch, weight_type=type_name, seed=5, embed_type=type_name if arch == "bitnet" else None)
    ids = [1, 5, 9, 200, 31]
    streamed = run_reference(str(model), ids, 0)
    cached = run_reference(str(model), ids, 2, prepared_dir=str(tmp_path / "p"))
    assert cached.settings["prepared_cache"]["kind"] == "persistent"
    assert any(e["dtype"] == "|i1" for e in json.loads((tmp_path / "p/manifest.json").read_text())["tensors"].values())
    assert np.array_equal(bits(cached.logits[: len(ids)]), bits(streamed.logits))


def _expected_weight(g, name: str, type_name: str) -> np.ndarray:  # type: ignore[no-untyped-def]
    """float64 [rows, cols] from an independent dequantizer: gguf-py's, or parity_both.gguf.quants for I2_S."""
    from parity_both.gguf import quants

    t = g.tensors[name]
    raw = np.asarray(g.raw(name))
    flat = quants.dequantize(raw, "I2_S", t.n_elements) if type_name == "I2_S" else gguf_deq(raw, type_name)
    return np.asarray(flat, dtype=np.float64).reshape(t.rows_cols)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cached", [True, False])
@pytest.mark.parametrize(("arch", "type_name"), [("llama", "TQ2_0"), ("bitnet-b1.58", "I2_S")])
def test_decode_steps_multiply_expanded_matrices_in_row_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cached: bool, threads: int, arch: str, type_name: str
) -> None:
    """A decode step (one row of x) times an int8-cached / dequantized ternary matrix goes in row blocks,
    on one thread or shared out to two; every output is the float64 dot product of the dequantized row to
    float32 rounding (independent expectation: gguf-py's / parity_both.gguf.quants' dequantization, float64
    matmul), and a block boundary inside the matrix is crossed (a 3-row block). I2_S's one scale is folded
    into x ((x d) C^T, the codes cast without a multiply)."""
    from parity_both.fixtures import write_fixture
    from parity_both.reference import weights as wmod

    model = tmp_path / "ternary.gguf"
    write_fixture(model, arch=arch, weight_type=type_name, embed_type="F16" if arch == "llama" else None)
    g = read_gguf(model)
    cache = PreparedCache(prepare_weights(model, tmp_path / "p"), tmp_path / "p") if cached else None
    store = WeightStore(g, cache, threads=threads)
    t = g.tensors["blk.0.ffn_down.weight"]
    rows, cols = t.rows_cols
    assert (store.tensor_scale(t.name) is not None) == (type_name == "I2_S")
    monkeypatch.setattr(wmod, "DECODE_CHUNK_BYTES", 3 * 4 * cols)
    monkeypatch.setattr(wmod, "DECODE_CHUNK_BYTES_THREADED", 3 * 4 * cols)
    expected_w = _expected_weight(g, t.name, type_name)
    x = np.random.default_rng(5).standard_normal((1, cols)).astype(np.float32)
    y = store.linear("blk.0.ffn_down", x)
    ref = x.astype(np.float64) @ expected_w.T
    assert y.shape == (1, rows) and y.dtype == np.float32
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # a prompt (many rows of x) takes the whole-matrix path (one block per thread): the same values to
    # float32 rounding
    xs = np.random.default_rng(6).standard_normal((16, cols)).astype(np.float32)
    ys = store.linear("blk.0.ffn_down", xs)
    np.testing.assert_allclose(ys, xs.astype(np.float64) @ expected_w.T, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(store.linear("blk.0.ffn_down", xs[:1]), ys[:1], rtol=1e-5, atol=1e-5)
    store.close()


@pytest.mark.parametrize("threads", [1, 2])
def test_f16_lm_head_read_in_place_is_held_as_float32(tmp_path: Path, threads: int) -> None:
    """A tied F16 embedding used as LM head (not in the prepared cache) is converted once to float32 and held
    (its values: NumPy's float16 -> float32, bit for bit), and the LM head's products match a float64 matmul."""
    from parity_both.fixtures import write_fixture

    model = tmp_path / "tied.gguf"
    write_fixture(model, arch="llama", weight_type="TQ2_0", embed_type="F16")
    g = read_gguf(model)
    assert "output.weight" not in g.tensors and g.tensors["token_embd.weight"].type_name == "F16"
    cache = PreparedCache(prepare_weights(model, tmp_path / "p"), tmp_path / "p")
    assert cache.held_in_place == {"token_embd.weight"} and "token_embd.weight" not in cache.entries
    store = WeightStore(g, cache, threads=threads)
    t = g.tensors["token_embd.weight"]
    rows, cols = t.rows_cols
    expected = np.asarray(g.raw(t.name)).view(np.float16).astype(np.float32).reshape(rows, cols)
    x = np.random.default_rng(7).standard_normal((3, cols)).astype(np.float32)
    y = store.linear("token_embd", x)
    held = store.dense_rows("token_embd.weight", 0, rows)
    assert np.array_equal(bits(held), bits(expected))
    assert store.dense_rows("token_embd.weight", 2, 5).base is held.base  # a view of the one held copy
    ref = x.astype(np.float64) @ expected.astype(np.float64).T
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    store.close()


def test_reference_on_two_threads_records_them_and_matches_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With two BLAS threads asked for, the reference runs matmul row blocks on two threads (OpenBLAS down
    to one each) and records it; its logits equal the one-thread run's to float32 rounding."""
    from parity_both.fixtures import write_fixture
    from parity_both.reference.blas import fix_blas_threads
    from parity_both.reference.engine import run_reference

    model = tmp_path / "m.gguf"
    write_fixture(model, arch="bitnet-b1.58", weight_type="I2_S", seed=3)
    runs = {}
    for n in ("1", "2"):
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", n)
        runs[n] = run_reference(str(model), [1, 5, 9, 200], 3)
    assert runs["2"].settings["numpy"]["blas_threads"] == 2
    assert runs["2"].settings["numpy"]["matmul"] == "2 row-block threads, one BLAS thread each"
    assert "matmul" not in runs["1"].settings["numpy"]
    assert runs["2"].ids == runs["1"].ids
    np.testing.assert_allclose(runs["2"].logits, runs["1"].logits, rtol=0, atol=1e-5 * np.abs(runs["1"].logits).max())
    assert fix_blas_threads()["blas_threads"] == 2  # the environment's count is set again, not left at one
