"""Property-based fuzzing (hypothesis) of the GGUF reader and the tokenizer rebuild from a GGUF vocabulary.

Any byte-level corruption of a small valid GGUF is either read or refused with GGUFError (a ValueError
naming the problem), and never makes the reader allocate more than a small multiple of the file: a header
that lies about a size cannot cause a large allocation. Any vocabulary is rebuilt or refused with the
documented errors. Bounded in the default suite (few examples, a deadline); longer under `slow`.
"""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parity_both.gguf.peek import peek_format
from parity_both.gguf.reader import GGUFError, read_gguf
from parity_both.tokenize.rebuild import rebuild_from_gguf
from parity_both.tokenize.vocab import TokenizerBuildError

FAST = settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
LONG = settings(max_examples=3000, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
ALLOC_LIMIT = 8 << 20  # bytes the reader may allocate for a ~2 KB file, whatever its header claims


def small_gguf(path: Path, tokens: list[str] | None = None, merges: list[str] | None = None, **kv: int) -> bytes:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    toks = tokens if tokens is not None else [chr(ord("a") + i) for i in range(20)]
    w.add_token_list(toks)
    w.add_token_types([1] * len(toks))
    w.add_token_merges(merges if merges is not None else ["a b", "c d"])
    for key, value in kv.items():
        w.add_uint32(f"tokenizer.ggml.{key}", value)
    w.add_tensor("token_embd.weight", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> bytes:
    return small_gguf(tmp_path_factory.mktemp("fuzz") / "base.gguf")


def read_bounded(path: Path) -> None:
    """read_gguf and the parse-time peek: success or GGUFError, within the allocation bound."""
    tracemalloc.start()
    try:
        for reader in (read_gguf, peek_format):
            try:
                reader(path)
            except GGUFError:
                pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < ALLOC_LIMIT, f"the reader allocated {peak} bytes for a {path.stat().st_size}-byte file"


edits = st.lists(
    st.tuples(st.integers(min_value=0, max_value=4095), st.binary(min_size=1, max_size=9)), min_size=1, max_size=4
)
lies = st.sampled_from([2**31 - 1, 2**32 - 1, 2**40, 2**62, 2**63, 2**64 - 1])


def corrupt(data: bytes, changes: list[tuple[int, bytes]], cut: int | None) -> bytes:
    b = bytearray(data)
    for pos, chunk in changes:
        pos %= len(b)
        b[pos : pos + len(chunk)] = chunk
    return bytes(b[:cut] if cut is not None else b)


def check_corruption(tmp_path: Path, data: bytes) -> None:
    p = tmp_path / "fuzz.gguf"
    p.write_bytes(data)
    read_bounded(p)


@FAST
@given(changes=edits, cut=st.none() | st.integers(min_value=0, max_value=4096))
def test_reader_survives_byte_corruption(base, tmp_path, changes, cut):
    check_corruption(tmp_path, corrupt(base, changes, cut))


@FAST
@given(at=st.integers(min_value=0, max_value=4095), value=lies)
def test_reader_is_bounded_when_a_size_field_lies(base, tmp_path, at, value):
    """Any aligned 8-byte field replaced by a huge count or length (string, array, tensor count, shape, offset)."""
    b = bytearray(base)
    at = (at % (len(b) - 8)) & ~3
    struct.pack_into("<Q", b, at, value)
    check_corruption(tmp_path, bytes(b))


@pytest.mark.slow
@LONG
@given(changes=edits, cut=st.none() | st.integers(min_value=0, max_value=4096))
def test_reader_survives_byte_corruption_long(base, tmp_path, changes, cut):
    check_corruption(tmp_path, corrupt(base, changes, cut))


token = st.text(min_size=0, max_size=6)
vocab = st.lists(token, min_size=1, max_size=40)
merges = st.lists(st.text(min_size=0, max_size=8), max_size=20)
ids = st.integers(min_value=0, max_value=2**32 - 1)


def check_rebuild(tmp_path: Path, tokens: list[str], merge_list: list[str], bos: int, eos: int) -> None:
    p = tmp_path / "vocab.gguf"
    small_gguf(p, tokens=tokens, merges=merge_list, bos_token_id=bos, eos_token_id=eos)
    try:
        rb = rebuild_from_gguf(p)
    except (TokenizerBuildError, GGUFError):
        return  # documented refusals (ValueErrors naming the problem)
    rb.tokenizer.encode("hello world")


@FAST
@given(tokens=vocab, merge_list=merges, bos=ids, eos=ids)
def test_tokenizer_rebuild_survives_any_vocabulary(tmp_path, tokens, merge_list, bos, eos):
    check_rebuild(tmp_path, tokens, merge_list, bos, eos)


@pytest.mark.slow
@settings(max_examples=1500, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tokens=vocab, merge_list=merges, bos=ids, eos=ids)
def test_tokenizer_rebuild_survives_any_vocabulary_long(tmp_path, tokens, merge_list, bos, eos):
    check_rebuild(tmp_path, tokens, merge_list, bos, eos)
