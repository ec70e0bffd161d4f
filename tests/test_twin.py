"""parity_both.gguf.twin: the lossless (dequantized) twin of a model.

Expectations come from outside the code under test: gguf-py's own reader and dequantizer for the
standard types, and for BitNet.cpp's I2_S (which gguf-py cannot read) the fixture generator's known
ternary weights times their scale. Every twin is loaded and evaluated by real llama.cpp.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf import quants as gq

from parity_both import fixtures
from parity_both.gguf import twin as twin_mod
from parity_both.gguf.reader import read_gguf
from parity_both.gguf.twin import twin_is_exact, write_twin

SEED = 21
DOCUMENTED = {"general.file_type", "general.architecture"}  # the only keys a twin may change


@functools.cache
def gguf_py(path: Path) -> GGUFReader:
    return GGUFReader(path)  # seconds per file (it materialises the 49152-token vocabulary): read once


def gguf_py_values(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a file as float32, by gguf-py's reader and dequantizer (file order)."""
    out = {}
    for t in gguf_py(path).tensors:
        raw = np.asarray(t.data)
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            out[t.name] = raw.astype(np.float32).reshape(-1)
        else:
            out[t.name] = gq.dequantize(raw.view(np.uint8), t.tensor_type).astype(np.float32).reshape(-1)
    return out


def twin_values(path: Path) -> dict[str, np.ndarray]:
    """A twin's tensors (F32 / F16 / BF16) as float32, decoded here from the raw bytes."""
    g = read_gguf(path)
    decode = {
        "F32": lambda b: b.view("<f4"),
        "F16": lambda b: b.view("<f2").astype(np.float32),
        "BF16": lambda b: (b.view("<u2").astype(np.uint32) << 16).view(np.float32),
    }
    return {n: decode[t.type_name](np.array(g.raw(n))) for n, t in g.tensors.items()}


def raw_kvs(path: Path) -> dict[str, bytes]:
    return {kv.key: struct.pack("<I", kv.vtype) + kv.value for kv in fixtures.read_raw_kvs(path)}


def gguf_py_fields(path: Path) -> dict[str, bytes]:
    """Every metadata key's value type and encoded value (the bytes after the key) as gguf-py reads them."""
    return {
        name: b"".join(np.asarray(p).tobytes() for p in f.parts[2:])
        for name, f in gguf_py(path).fields.items()
        if not name.startswith("GGUF.")
    }


@functools.cache
def evaluate(path: Path) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=False, n_ctx=64, logits_all=True, verbose=False)
    toks = llm.tokenize(b"The quick brown fox jumps over the lazy dog", add_bos=False)
    llm.reset()
    llm.eval(toks)
    logits = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
    llm.close()
    assert logits.shape == (len(toks), 49152)
    return logits


@pytest.fixture(scope="module")
def i2s(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    d = tmp_path_factory.mktemp("twin_i2s")
    src = d / "b158_i2s.gguf"
    fixtures.write_fixture(src, arch="bitnet-b1.58", weight_type="I2_S", size="tiny", seed=SEED)
    return src, d / "twin.gguf", write_twin(src, d / "twin.gguf")


@pytest.fixture(scope="module")
def q41(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    d = tmp_path_factory.mktemp("twin_q41")
    src = d / "llama_q41.gguf"
    fixtures.write_fixture(src, arch="llama", weight_type="Q4_1", size="tiny", seed=SEED)
    return src, d / "twin.gguf", write_twin(src, d / "twin.gguf")


def i2s_expected(name: str, ne: tuple[int, ...]) -> np.ndarray:
    """The I2_S fixture's weights straight from the generator's recipe (not from any GGUF reader)."""
    rng = fixtures._rng(SEED, name)
    if name == "token_embd.weight":  # dense, std 0.3, stored F16
        w = rng.standard_normal((ne[1], ne[0]), dtype=np.float32) * np.float32(0.3)
        return w.astype(np.float16).astype(np.float32).reshape(-1)
    if len(ne) == 1:  # norm weights, F32
        return (1.0 + 0.1 * rng.standard_normal(ne[0], dtype=np.float32)).astype(np.float32)
    t, s = fixtures._ternary(rng, ne[1], ne[0])
    return (t.astype(np.float32) * np.float32(s)).reshape(-1)


def test_i2s_twin_values_and_metadata(i2s: tuple[Path, Path, dict[str, Any]]) -> None:
    src, twin, rec = i2s
    g = read_gguf(twin)
    assert g.type_counts() == {"F32": 24}  # token_embd, output_norm, 2 layers x (7 matrices + 4 norms)
    got = twin_values(twin)
    for name, t in g.tensors.items():
        np.testing.assert_array_equal(got[name], i2s_expected(name, t.shape), name)
    # metadata: the fork's prefix renamed to mainline's, file type F32, everything else byte for byte
    a, b = raw_kvs(src), raw_kvs(twin)
    assert list(b) == [k.replace("bitnet-b1.58.", "bitnet.") for k in a]
    assert {k for k in a if a[k] != b[k.replace("bitnet-b1.58.", "bitnet.")]} == DOCUMENTED
    assert g.architecture == "bitnet" and g.metadata["general.file_type"] == 0
    assert rec["arch_rename"] == {"from": "bitnet-b1.58", "to": "bitnet"}
    assert rec["keys_renamed"]["bitnet-b1.58.block_count"] == "bitnet.block_count"
    assert rec["exact"] is True and rec["dtype"] == "F32"
    assert rec["tensors"]["blk.0.ffn_up.weight"] == {"source_type": "I2_S", "type": "F32", "rounded": "exact"}
    assert rec["twin"]["bytes"] == twin.stat().st_size
    json.dumps(rec, allow_nan=False)


def test_q41_twin_equals_gguf_py_dequantization(q41: tuple[Path, Path, dict[str, Any]]) -> None:
    src, twin, rec = q41
    expect, got = gguf_py_values(src), twin_values(twin)
    assert list(got) == list(expect)
    for name, values in expect.items():
        np.testing.assert_array_equal(got[name], values, name)
    a, b = raw_kvs(src), raw_kvs(twin)
    assert list(a) == list(b)  # same keys, same order
    assert {k for k in a if a[k] != b[k]} == {"general.file_type"}
    assert rec["arch_rename"] is None and rec["keys_changed"] == {"general.file_type": {"from": 3, "to": 0}}


def test_twins_load_and_evaluate_in_llama_cpp(
    i2s: tuple[Path, Path, dict[str, Any]], q41: tuple[Path, Path, dict[str, Any]], tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="Failed to load model"):  # mainline refuses the BitNet.cpp original
        llama_cpp.Llama(model_path=str(i2s[0]), n_ctx=64, verbose=False)
    for twin in (i2s[1], q41[1]):
        logits = evaluate(twin)
        assert np.isfinite(logits).all() and logits.std() > 0.1
    f16 = tmp_path / "f16.gguf"  # matrices F16, norms kept F32
    write_twin(i2s[0], f16, "F16")
    assert read_gguf(f16).type_counts() == {"F16": 15, "F32": 9}
    # close, not equal: ggml's F16 matmul rounds the activations to F16 as well
    np.testing.assert_allclose(evaluate(f16), evaluate(i2s[1]), atol=0.1)


def test_f16_bf16_rounding_recorded(
    i2s: tuple[Path, Path, dict[str, Any]], q41: tuple[Path, Path, dict[str, Any]], tmp_path: Path
) -> None:
    # ternary weights with an fp16-exact scale and F16 embeddings: an F16 twin is exact
    rec = write_twin(i2s[0], tmp_path / "i2s16.gguf", "F16")
    assert rec["exact"] is True and twin_is_exact(i2s[0], "F16") is True
    assert all(e.get("n_changed", 0) == 0 for e in rec["tensors"].values())
    # Q4_1 values (d * q + m) do not fit bf16's 8-bit significand: what was rounded is recorded
    bf = tmp_path / "q41bf16.gguf"
    rec = write_twin(q41[0], bf, "BF16")
    expect, got = gguf_py_values(q41[0]), twin_values(bf)
    for name, e in rec["tensors"].items():
        delta = np.abs(got[name].astype(np.float64) - expect[name].astype(np.float64))
        if e["type"] == "F32":
            assert e["rounded"] == "exact" and not delta.any()
        else:
            assert e["n_changed"] == int(np.count_nonzero(delta)), name
            assert e["max_abs_delta"] == pytest.approx(float(delta.max()), rel=0, abs=0), name
    assert rec["exact"] is False and twin_is_exact(q41[0], "BF16") is False
    assert sum(e.get("n_changed", 0) for e in rec["tensors"].values()) > 0


def test_atomic_no_file_left_on_failure(i2s: tuple[Path, Path, dict[str, Any]], tmp_path: Path) -> None:
    dst = tmp_path / "twin.gguf"
    dst.write_bytes(b"previous")

    def stop(done: int, total: int, name: str) -> None:
        if done == 3:
            raise KeyboardInterrupt  # like a killed job, mid-file

    with pytest.raises(KeyboardInterrupt):
        write_twin(i2s[0], dst, progress=stop)
    assert os.listdir(tmp_path) == ["twin.gguf"] and dst.read_bytes() == b"previous"
    seen: list[tuple[int, int]] = []
    write_twin(i2s[0], dst, progress=lambda done, total, name: seen.append((done, total)))
    assert seen[-1] == (24, 24) and os.listdir(tmp_path) == ["twin.gguf"]


def test_deterministic_chunked_and_cli(
    i2s: tuple[Path, Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(twin_mod, "CHUNK_ELEMENTS", 1000)  # -> 896-element chunks: I2_S split mid-tensor
    rec = write_twin(i2s[0], tmp_path / "a.gguf")
    monkeypatch.undo()
    assert rec["twin"]["sha256"] == i2s[2]["twin"]["sha256"]
    assert rec["twin"]["sha256"] == hashlib.sha256((tmp_path / "a.gguf").read_bytes()).hexdigest()
    cli = subprocess.run(
        [sys.executable, "-m", "parity_both.gguf.twin", str(i2s[0]), str(tmp_path / "b.gguf")],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0, cli.stderr
    out = json.loads(cli.stdout)
    assert out["twin"]["sha256"] == rec["twin"]["sha256"] and out["tensors"] == rec["tensors"]
    bad = subprocess.run(
        [sys.executable, "-m", "parity_both.gguf.twin", str(tmp_path / "missing.gguf"), str(tmp_path / "c.gguf")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "cannot open" in bad.stderr
    with pytest.raises(ValueError, match="dtype"):
        write_twin(i2s[0], tmp_path / "d.gguf", "Q8_0")


@pytest.mark.slow  # writes a 540 MB twin
def test_embedded_model_twin(smol_path: str, tmp_path: Path) -> None:
    src, twin = Path(smol_path), tmp_path / "smol_f32.gguf"
    rec = write_twin(src, twin)
    expect, got = gguf_py_values(src), gguf_py_values(twin)
    assert list(got) == list(expect)
    for name, values in expect.items():
        np.testing.assert_array_equal(got[name], values, name)
    a, b = gguf_py_fields(src), gguf_py_fields(twin)
    assert list(a) == list(b) and {k for k in a if a[k] != b[k]} == {"general.file_type"}
    assert rec["exact"] is True and rec["twin"]["bytes"] == twin.stat().st_size
    # the quantized original and its twin compute nearly the same thing (same weights, different kernels)
    lt, lq = evaluate(twin), evaluate(src)
    assert np.isfinite(lt).all()
    assert (lt.argmax(-1) == lq.argmax(-1)).mean() > 0.8
    assert twin_is_exact(src, "F16") is False


def test_auto_dtype_agrees_with_the_full_exactness_check(
    i2s: tuple[Path, Path, dict[str, Any]], q41: tuple[Path, Path, dict[str, Any]], tmp_path: Path
) -> None:
    """`auto` judges ternary tensors from their scales alone; it must pick what twin_is_exact (every
    dequantized value converted and compared) allows: F16, else BF16, else F32; non-ternary -> F32."""
    tq2 = tmp_path / "tq2.gguf"
    fixtures.write_fixture(tq2, arch="bitnet", weight_type="TQ2_0", size="tiny", seed=SEED)
    for src in (i2s[0], tq2):
        want = next((d for d in ("F16", "BF16") if twin_is_exact(src, d)), "F32")
        g = read_gguf(src)
        assert twin_mod.auto_dtype(g) == want
        g.close()
    g = read_gguf(tq2)
    assert twin_mod.auto_dtype(g) == "F16"  # fp16 block scales: F16 holds every q * d
    g.close()
    g = read_gguf(q41[0])
    assert twin_mod.auto_dtype(g) == "F32"
    g.close()
    rec = write_twin(tq2, tmp_path / "auto.gguf", "auto")
    assert rec["dtype"] == "F16" and rec["requested_dtype"] == "auto" and rec["exact"] is True


def test_twin_that_would_fill_the_disk_is_refused(
    i2s: tuple[Path, Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(twin_mod, "DISK_RESERVE", 1 << 60)
    with pytest.raises(twin_mod.TwinDiskError, match="needs .* GiB free") as e:
        write_twin(i2s[0], tmp_path / "t.gguf")
    assert "\n" not in str(e.value) and e.value.code == 2 and os.listdir(tmp_path) == []
