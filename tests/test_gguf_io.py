"""parity_both.gguf.lowlevel / reader / peek / writer: the one GGUF parser and the one writer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import llama_cpp
import pytest

from parity_both.gguf.constants import MAINLINE_TYPES, TYPE_IDS
from parity_both.gguf.lowlevel import GGUFError
from parity_both.gguf.peek import peek_format
from parity_both.gguf.reader import read_gguf, read_string_array_bytes
from parity_both.gguf.writer import TensorSpec, kv_f32, kv_str, kv_u32, read_raw_kvs, write_gguf


def test_token_bytes_equal_llama_cpp_token_texts(smol_path: str) -> None:
    """The raw token strings are llama.cpp's own (read through its vocab API), byte for byte."""
    toks = read_string_array_bytes(smol_path, "tokenizer.ggml.tokens")
    llm = llama_cpp.Llama(model_path=smol_path, vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n = llama_cpp.llama_vocab_n_tokens(vocab)
    theirs = [llama_cpp.llama_vocab_get_text(vocab, i) for i in range(n)]
    llm.close()
    assert len(toks) == n == 49152
    assert toks == theirs
    assert read_string_array_bytes(smol_path, "no.such.key") == []
    with pytest.raises(GGUFError, match="not an array of strings"):
        read_string_array_bytes(smol_path, "tokenizer.ggml.token_type")


def test_invalid_utf8_token_kept_raw(tmp_path: Path) -> None:
    path = tmp_path / "v.gguf"
    raw = b"\xe2\x82"  # half a UTF-8 sequence: read_gguf shows U+FFFD, the raw reader keeps the bytes
    arr = (8).to_bytes(4, "little") + (2).to_bytes(8, "little")
    for s in (b"ok", raw):
        arr += len(s).to_bytes(8, "little") + s
    from parity_both.gguf.writer import RawKV

    write_gguf(path, [kv_str("general.architecture", "llama"), RawKV("tokenizer.ggml.tokens", 9, arr)], [])
    assert read_string_array_bytes(path, "tokenizer.ggml.tokens") == [b"ok", raw]
    assert read_gguf(path).metadata["tokenizer.ggml.tokens"] == ["ok", "\ufffd"]


def test_peek_agrees_with_full_reader_without_numpy(smol_path: str) -> None:
    g = read_gguf(smol_path)
    arch, types = peek_format(smol_path)
    assert arch == g.architecture == "llama"
    assert types == {t.type_id for t in g.tensors.values()} == {0, 3, 8}  # F32, Q4_1, Q8_0
    code = (
        "import sys; from parity_both.gguf.peek import peek_format; "
        f"peek_format({smol_path!r}); sys.exit(3 if 'numpy' in sys.modules else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_round_trip_and_truncation(tmp_path: Path) -> None:
    path = tmp_path / "t.gguf"
    kvs = [kv_str("general.architecture", "llama"), kv_u32("llama.block_count", 3), kv_f32("x.eps", 0.5)]
    data = bytes(range(256)) * 2  # 128 float32
    w = write_gguf(path, kvs, [TensorSpec("a.weight", (64, 2), "F32", lambda: data)])
    assert read_raw_kvs(path) == kvs
    g = read_gguf(path)
    assert g.metadata == {"general.architecture": "llama", "llama.block_count": 3, "x.eps": 0.5}
    t = g.tensors["a.weight"]
    assert (t.shape, t.type_name, t.offset % 32, bytes(g.raw("a.weight"))) == ((64, 2), "F32", 0, data)
    assert w.bytes == path.stat().st_size
    blob = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(blob[:-100])
    with pytest.raises(GGUFError, match="truncated GGUF: tensor 'a.weight'"):
        read_gguf(tmp_path / "cut.gguf")
    (tmp_path / "head.gguf").write_bytes(blob[:40])
    with pytest.raises(GGUFError, match="truncated GGUF"):
        peek_format(tmp_path / "head.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"GGML" + blob[4:])
    with pytest.raises(GGUFError, match="bad magic"):
        read_gguf(tmp_path / "bad.gguf")


def test_writer_atomic_on_failure(tmp_path: Path) -> None:
    def boom() -> bytes:
        raise RuntimeError("producer failed")

    specs = [TensorSpec("a", (32,), "F32", lambda: b"\0" * 128), TensorSpec("b", (32,), "F32", boom)]
    with pytest.raises(RuntimeError, match="producer failed"):
        write_gguf(tmp_path / "x.gguf", [], specs)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(AssertionError, match="produced 4 bytes, expected 128"):
        write_gguf(tmp_path / "x.gguf", [], [TensorSpec("a", (32,), "F32", lambda: b"\0" * 4)])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="duplicate"):
        write_gguf(tmp_path / "x.gguf", [kv_u32("k", 1), kv_u32("k", 2)], [])


def test_type_tables_match_gguf_py() -> None:
    """Our tensor-type table (ids, block elements, block bytes) against gguf-py's for every type it knows."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    known = {t.name: t for t in GGMLQuantizationType}
    checked = 0
    for tid, (name, blk, size) in MAINLINE_TYPES.items():
        if name in known:
            assert int(known[name]) == tid == TYPE_IDS[name]
            if name == "Q8_1":  # gguf-py keeps the old float d, s (40 bytes); ggml's block_q8_1 is 2 halves + 32
                assert (blk, size) == (32, 36) and GGML_QUANT_SIZES[known[name]] == (32, 40)
                continue
            assert GGML_QUANT_SIZES[known[name]] == (blk, size), name
            checked += 1
    assert checked >= 30 and TYPE_IDS["I2_S"] == 36


@pytest.mark.parametrize("read_ahead", [1 << 20, 3, 9, 16])
def test_read_strings_reads_ahead_and_gives_back_the_rest(monkeypatch: pytest.MonkeyPatch, read_ahead: int) -> None:
    """String arrays are parsed from read-ahead blocks: every block boundary (lengths and strings split across
    blocks), invalid UTF-8 kept as bytes or replaced as read_string does, the stream left right after the last
    string, and truncation or an implausible length refused with read_string_bytes' messages."""
    import io
    import struct

    from parity_both.gguf import lowlevel

    monkeypatch.setattr(lowlevel, "_READ_AHEAD", read_ahead)
    items = [b"", b"a", "é€".encode(), b"\xff\xfe", b"x" * 40]
    blob = b"".join(struct.pack("<Q", len(b)) + b for b in items) + b"TAIL"
    fh = io.BytesIO(blob)
    assert lowlevel.read_strings(fh, len(items), keep="bytes") == items
    assert fh.read() == b"TAIL"
    fh.seek(0)
    assert lowlevel.read_strings(fh, len(items)) == [b.decode("utf-8", errors="replace") for b in items]
    assert fh.read() == b"TAIL"
    fh.seek(0)
    assert lowlevel.read_strings(fh, len(items), keep=None) == []
    assert fh.tell() == len(blob) - 4
    with pytest.raises(lowlevel.GGUFError, match="file ends inside a string length"):
        lowlevel.read_strings(io.BytesIO(blob[:-4]), len(items) + 1)
    with pytest.raises(lowlevel.GGUFError, match="file ends inside a string"):
        lowlevel.read_strings(io.BytesIO(blob[: len(blob) - 10]), len(items))
    with pytest.raises(lowlevel.GGUFError, match="string length 1125899906842624 is implausible"):
        lowlevel.read_strings(io.BytesIO(struct.pack("<Q", 1 << 50) + b"abc"), 1)
