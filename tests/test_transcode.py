"""parity_both.gguf.transcode: BitNet.cpp I2_S / bitnet-b1.58 GGUF -> a GGUF mainline llama.cpp loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gq

from parity_both.fixtures import write_fixture
from parity_both.gguf import quants
from parity_both.gguf.reader import GGUFError, read_gguf
from parity_both.gguf.transcode import transcode
from parity_both.gguf.writer import TensorSpec, kv_str, kv_u32, read_raw_kvs, write_gguf

from conftest import llama_cpp_model


def independent_i2s(values: list[int], scale: float) -> bytes:
    """I2_S from the layout description (same as tests/test_quants.py; not quants.pack_i2s)."""
    n = len(values)
    out = bytearray(n // 4 + 32)
    for i, v in enumerate(values):
        block, j = divmod(i, 128)
        out[block * 32 + j % 32] |= (v + 1) << (6 - 2 * (j // 32))
    out[n // 4 : n // 4 + 4] = np.float32(scale).tobytes()
    return bytes(out)


def make_llama(path: Path) -> Any:
    return llama_cpp_model(path)


@pytest.fixture(scope="module")
def i2s_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tc") / "b158_i2s.gguf"
    write_fixture(path, arch="bitnet-b1.58", weight_type="I2_S", size="tiny", seed=21)
    return path


def test_transcoded_fixture_loads_in_llama_cpp(i2s_fixture: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Failed to load model"):  # mainline cannot load the BitNet.cpp original
        make_llama(i2s_fixture)
    out = tmp_path / "tq2.gguf"
    rec = transcode(i2s_fixture, out)
    assert rec["tensors_transcoded"] == 14 and rec["max_rel_scale_change"] == 0.0
    assert rec["output_architecture"] == "bitnet" and rec["source_type_numbering"] == "bitnet.cpp"
    assert rec["keys_renamed"]["bitnet-b1.58.block_count"] == "bitnet.block_count"
    assert rec["keys_changed"]["general.file_type"] == {"from": 40, "to": 37}
    llm = make_llama(out)
    toks = llm.tokenize(b"The quick brown fox jumps over the lazy dog", add_bos=False)
    llm.reset()
    llm.eval(toks)
    logits = np.array(llm.scores[: llm.n_tokens])
    llm.close()
    assert logits.shape == (len(toks), 49152) and np.isfinite(logits).all()


def test_transcode_equals_gguf_py_tq2_0_of_same_weights(i2s_fixture: Path, tmp_path: Path) -> None:
    """The I2_S fixture and the bitnet TQ2_0 fixture of one seed hold the same ternary weights; gguf-py's
    own TQ2_0 quantizer (an independent implementation) must produce exactly our transcoded bytes."""
    out = tmp_path / "tq2.gguf"
    transcode(i2s_fixture, out)
    ref = tmp_path / "ref.gguf"
    write_fixture(ref, arch="bitnet", weight_type="TQ2_0", size="tiny", seed=21)
    a, b = read_gguf(out), read_gguf(ref)
    assert a.type_numbering == "mainline" and a.type_counts() == b.type_counts()
    for name in b.tensors:
        assert bytes(a.raw(name)) == bytes(b.raw(name)), name
    skip = {"general.name", "parity_both.fixture.args"}
    ka = [kv for kv in read_raw_kvs(out) if kv.key not in skip]
    kb = [kv for kv in read_raw_kvs(ref) if kv.key not in skip]
    assert ka == kb  # same keys (renamed), same values, same order


def _bitnet_cpp_file(path: Path, scale: float, extra_tensor: TensorSpec | None = None) -> np.ndarray:
    """A minimal BitNet.cpp-style file with one I2_S matrix written by the test's own packer."""
    rng = np.random.default_rng(4)
    t = rng.integers(-1, 2, size=(4, 512)).astype(np.int8)
    data = independent_i2s(t.reshape(-1).tolist(), scale)
    tensors = [TensorSpec("blk.0.ffn_up.weight", (512, 4), "I2_S", lambda: data)]
    if extra_tensor is not None:
        tensors.append(extra_tensor)
    kvs = [
        kv_str("general.architecture", "bitnet-b1.58"),
        kv_u32("general.file_type", 40),
        kv_u32("bitnet-b1.58.block_count", 1),
    ]
    write_gguf(path, kvs, tensors)
    return t


def test_scale_rounding_recorded(tmp_path: Path) -> None:
    src, out = tmp_path / "s.gguf", tmp_path / "o.gguf"
    scale = 0.0123456
    t = _bitnet_cpp_file(src, scale)
    rec = transcode(src, out)
    expect = abs(float(np.float16(scale)) - float(np.float32(scale))) / float(np.float32(scale))
    assert rec["max_rel_scale_change"] == pytest.approx(expect, rel=1e-12) and 0 < expect <= 2.0**-11
    g = read_gguf(out)
    w_tq2 = gq.dequantize(np.asarray(g.raw("blk.0.ffn_up.weight")), GGMLQuantizationType.TQ2_0).reshape(-1)
    w_i2s = quants.dequantize(read_gguf(src).raw("blk.0.ffn_up.weight"), "I2_S", t.size)
    np.testing.assert_array_equal(w_tq2, t.reshape(-1) * np.float32(np.float16(scale)))
    np.testing.assert_allclose(w_tq2, w_i2s, rtol=2.0**-11, atol=0)
    assert g.metadata["bitnet.block_count"] == 1 and "bitnet-b1.58.block_count" not in g.metadata


def test_deterministic_and_cli(i2s_fixture: Path, tmp_path: Path) -> None:
    r1 = transcode(i2s_fixture, tmp_path / "a.gguf")
    cli = subprocess.run(
        [sys.executable, "-m", "parity_both.gguf.transcode", str(i2s_fixture), str(tmp_path / "b.gguf")],
        check=True,
        capture_output=True,
        text=True,
    )
    r2 = json.loads(cli.stdout)
    assert r1["output_sha256"] == r2["output_sha256"] and r1["source_sha256"] == r2["source_sha256"]
    bad = subprocess.run(
        [sys.executable, "-m", "parity_both.gguf.transcode", str(tmp_path / "missing.gguf"), str(tmp_path / "c.gguf")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "cannot open" in bad.stderr


def test_lut_types_refused(tmp_path: Path) -> None:
    src = tmp_path / "tl2.gguf"
    # BitNet.cpp's TL2 (id 39 in its numbering) has no fixed layout we can read: refuse, never guess
    tl2 = TensorSpec("blk.0.ffn_down.weight", (512, 4), "F32", lambda: b"\0" * 8192, type_id=39)
    _bitnet_cpp_file(src, 0.5, extra_tensor=tl2)
    with pytest.raises(GGUFError, match="TL2"):
        transcode(src, tmp_path / "out.gguf")


def test_i2s_rows_not_multiple_of_256_refused(tmp_path: Path) -> None:
    src = tmp_path / "odd.gguf"
    data = independent_i2s([1, 0, -1, 0] * 96, 0.5)  # 3 rows of 128
    write_gguf(
        src,
        [kv_str("general.architecture", "bitnet-b1.58")],
        [TensorSpec("blk.0.attn_q.weight", (128, 3), "I2_S", lambda: data)],
    )
    with pytest.raises(GGUFError, match="multiples of 256"):
        transcode(src, tmp_path / "out.gguf")
