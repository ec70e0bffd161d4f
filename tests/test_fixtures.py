"""parity_both.fixtures: deterministic GGUF fixtures that real llama.cpp loads and evaluates."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFReader

from parity_both.fixtures import default_vocab_gguf, fixture_dims, write_fixture
from parity_both.gguf import quants
from parity_both.gguf.reader import read_gguf
from parity_both.gguf.writer import read_raw_kvs

from conftest import llama_cpp_model

PROMPT = "Hello world, this is a parity test.\nSecond line with numbers 12345 and émojis ✓"


def make_llama(path: Path, *, vocab_only: bool = False) -> Any:
    return llama_cpp_model(path, vocab_only=vocab_only)


CASES = [
    ("llama", "F32", False),
    ("llama", "F16", False),
    ("llama", "Q8_0", False),
    ("llama", "Q4_0", False),
    ("llama", "Q4_1", False),
    ("bitnet", "TQ1_0", False),
    ("bitnet", "TQ2_0", False),
    ("bitnet", "TQ2_0", True),
    ("bitnet", "F16", False),
]


@pytest.mark.parametrize(("arch", "weight_type", "scales"), CASES)
def test_fixture_loads_and_evaluates_in_llama_cpp(tmp_path: Path, arch: str, weight_type: str, scales: bool) -> None:
    path = tmp_path / "m.gguf"
    facts = write_fixture(path, arch=arch, weight_type=weight_type, size="tiny", seed=1, scale_tensors=scales)
    assert facts["dims"]["n_vocab"] == 49152
    assert path.stat().st_size == facts["bytes"] < 30_000_000
    llm = make_llama(path)
    toks = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
    assert len(toks) > 10
    llm.reset()
    llm.eval(toks)
    logits = np.array(llm.scores[: llm.n_tokens])
    llm.close()
    assert logits.shape == (len(toks), 49152)
    assert np.isfinite(logits).all()
    assert logits.std() > 0.1  # not a degenerate model


def test_vocabulary_is_the_real_one(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_fixture(path, arch="llama", weight_type="Q4_0", seed=2)
    src = {kv.key: kv for kv in read_raw_kvs(default_vocab_gguf()) if kv.key.startswith("tokenizer.")}
    dst = {kv.key: kv for kv in read_raw_kvs(path) if kv.key.startswith("tokenizer.")}
    assert "tokenizer.chat_template" in src
    assert src == dst  # every tokenizer key, byte for byte (value types included)
    # the fixture tokenizes exactly like the model the vocabulary came from (real llama.cpp on both)
    a, b = make_llama(path, vocab_only=True), make_llama(default_vocab_gguf(), vocab_only=True)
    for text in (PROMPT, "<|im_start|>user\nhi<|im_end|>\n"):
        for special in (False, True):
            assert a.tokenize(text.encode(), add_bos=False, special=special) == b.tokenize(
                text.encode(), add_bos=False, special=special
            )
    assert a.metadata["tokenizer.chat_template"] == b.metadata["tokenizer.chat_template"]


def test_same_args_same_bytes(tmp_path: Path) -> None:
    f1 = write_fixture(tmp_path / "a.gguf", arch="bitnet", weight_type="TQ2_0", seed=5)
    f2 = write_fixture(tmp_path / "b.gguf", arch="bitnet", weight_type="TQ2_0", seed=5)
    f3 = write_fixture(tmp_path / "c.gguf", arch="bitnet", weight_type="TQ2_0", seed=6)
    assert f1["sha256"] == f2["sha256"] != f3["sha256"]
    assert f1["sha256"] == hashlib.sha256((tmp_path / "a.gguf").read_bytes()).hexdigest()
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_cli_writes_same_file_as_api(tmp_path: Path) -> None:
    api = write_fixture(tmp_path / "api.gguf", arch="llama", weight_type="Q8_0", seed=3)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "parity_both.fixtures",
            "--arch",
            "llama",
            "--weight-type",
            "Q8_0",
            "--seed",
            "3",
            "--vocab-gguf",
            str(default_vocab_gguf()),
            str(tmp_path / "cli.gguf"),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert json.loads(out.stdout)["sha256"] == api["sha256"]
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "parity_both.fixtures",
            "--arch",
            "llama",
            "--weight-type",
            "TQ2_0",
            "--dim",
            "n_embd=64",
            str(tmp_path / "x.gguf"),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "multiple of 256" in bad.stderr


def test_same_seed_same_weights_across_types(tmp_path: Path) -> None:
    """Each tensor has its own seed: Q8_0 and F32 fixtures of one seed hold the same weights."""
    write_fixture(tmp_path / "f.gguf", arch="llama", weight_type="F32", seed=4)
    write_fixture(tmp_path / "q.gguf", arch="llama", weight_type="Q8_0", seed=4)
    f, q = read_gguf(tmp_path / "f.gguf"), read_gguf(tmp_path / "q.gguf")
    name = "blk.1.ffn_down.weight"
    wf = quants.dequantize(f.raw(name), "F32", f.tensors[name].n_elements)
    wq = quants.dequantize(q.raw(name), "Q8_0", q.tensors[name].n_elements)
    assert np.abs(wf - wq).max() < np.abs(wf).max() / 100


def test_gguf_py_reads_mainline_fixture(tmp_path: Path) -> None:
    """An independent reader (gguf-py) sees the same tensors and bytes as ours."""
    path = tmp_path / "m.gguf"
    write_fixture(path, arch="bitnet", weight_type="TQ1_0", seed=7, scale_tensors=True)
    ours, theirs = read_gguf(path), GGUFReader(path)
    assert {t.name for t in theirs.tensors} == set(ours.tensors)
    for t in theirs.tensors:
        assert t.tensor_type.name == ours.tensors[t.name].type_name
        assert tuple(int(s) for s in t.shape) == ours.tensors[t.name].shape
        assert bytes(np.asarray(t.data).view(np.uint8).reshape(-1)) == bytes(ours.raw(t.name))
    assert "blk.0.attn_q.scale" in ours.tensors and "blk.1.ffn_sub_norm.weight" in ours.tensors
    fields = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(fields) == list(ours.metadata)  # every key, in file order
    for key, value in fields.items():
        assert ours.metadata[key] == value, key
    assert ours.metadata["general.architecture"] == "bitnet"
    assert ours.metadata["bitnet.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)


def test_i2s_fixture_layout(tmp_path: Path) -> None:
    path = tmp_path / "b.gguf"
    facts = write_fixture(path, arch="bitnet-b1.58", weight_type="I2_S", seed=8)
    g = read_gguf(path)
    assert g.type_numbering == "bitnet.cpp" and facts["type_numbering"] == "bitnet.cpp"
    assert g.architecture == "bitnet-b1.58" and g.metadata["general.file_type"] == 40
    t = g.tensors["blk.0.ffn_down.weight"]
    assert t.type_name == "I2_S" and t.nbytes == t.n_elements // 4 + 32
    w = quants.dequantize(g.raw(t.name), "I2_S", t.n_elements)
    scale = np.abs(w).max()
    assert set(np.unique(w / scale)) <= {-1.0, 0.0, 1.0}
    assert np.float16(scale) == scale  # fp16-exact, so a TQ2_0 copy is lossless
    assert g.tensors["token_embd.weight"].type_name == "F16"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="arch"):
        fixture_dims("gpt2", "F32", "tiny")
    with pytest.raises(ValueError, match="multiple of 256"):
        fixture_dims("bitnet", "TQ2_0", "tiny", n_embd=128, head_dim=32)
    with pytest.raises(ValueError, match="unknown dimension"):
        fixture_dims("llama", "F32", "tiny", width=3)
    assert fixture_dims("llama", "Q4_0", "tiny")["n_embd"] == 64
    assert fixture_dims("llama", "TQ2_0", "tiny")["n_embd"] == 256


@pytest.mark.slow
def test_large_fixture(tmp_path: Path) -> None:
    facts = write_fixture(tmp_path / "big.gguf", arch="llama", weight_type="F16", size="large", seed=0)
    assert 200e6 < facts["bytes"] < 600e6
    llm = make_llama(tmp_path / "big.gguf")
    llm.eval([1, 2, 3])
    assert np.isfinite(np.array(llm.scores[:3])).all()


def test_2b4t_size_has_the_bitnet_2b_shape_and_a_128256_token_llama_bpe_vocab() -> None:
    """BitNet b1.58 2B-4T's published dimensions; the vocabulary is llama.cpp's own llama-bpe GGUF."""
    from parity_both.fixtures import _vocab_kvs, family_vocab_gguf, fixture_dims

    dims = fixture_dims("bitnet-b1.58", "I2_S", "2b4t")
    assert (dims["n_embd"], dims["n_layer"], dims["n_ff"], dims["n_head"], dims["n_head_kv"]) == (2560, 30, 6912, 20, 5)
    assert fixture_dims("bitnet", "TQ2_0", "2b4t")["head_dim"] == 128
    vocab = family_vocab_gguf("bitnet-b1.58", "2b4t")
    assert vocab.name == "ggml-vocab-llama-bpe.gguf" and _vocab_kvs(vocab)[1] == 128256


def test_fixture_generator_reports_progress(tmp_path, monkeypatch, capsys) -> None:
    from parity_both import progress
    from parity_both.fixtures import write_fixture

    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)
    write_fixture(tmp_path / "m.gguf", arch="llama", weight_type="Q8_0")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[fixture tiny]")]
    assert lines and "MB/s" in lines[-1] and "finished" in lines[-1]
