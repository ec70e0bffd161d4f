"""llama.cpp's own view of a vocabulary, through llama-cpp-python's low-level API."""

from __future__ import annotations

import ctypes
from typing import Any

import llama_cpp

from parity_both.lanes.base import VocabDump
from parity_both.tokenize.attrs import kind_from_attr


def llama_vocab_ptr(llm: Any) -> Any:
    """The llama_vocab pointer of a llama_cpp.Llama, its _model, a llama_model pointer or the pointer itself."""
    model = getattr(llm, "_model", llm)
    vocab = getattr(model, "vocab", None)
    if vocab is None:
        vocab = llama_cpp.llama_model_get_vocab(getattr(model, "model", model))
    return vocab


def vocab_dump_from_llama_cpp(llm: Any) -> VocabDump:
    """The vocabulary as llama.cpp reports it (llama_cpp.Llama, its _model, or a llama_vocab pointer)."""
    vocab = llama_vocab_ptr(llm)
    n = int(llama_cpp.llama_vocab_n_tokens(vocab))
    tokens = []
    for i in range(n):
        text = llama_cpp.llama_vocab_get_text(vocab, i).decode("utf-8", errors="replace")
        tokens.append((i, text, kind_from_attr(int(llama_cpp.llama_vocab_get_attr(vocab, i)))))

    def tid(x: int) -> int | None:
        return None if x < 0 else int(x)

    return VocabDump(
        tokens=tokens,
        bos_id=tid(llama_cpp.llama_vocab_bos(vocab)),
        eos_id=tid(llama_cpp.llama_vocab_eos(vocab)),
        add_bos=bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        add_eos=bool(llama_cpp.llama_vocab_get_add_eos(vocab)),
    )


def llama_cpp_piece_bytes(llm: Any, token_id: int) -> bytes:
    """llama_token_to_piece(special=True) with a buffer large enough for any piece."""
    vocab = llama_vocab_ptr(llm)
    size = 256
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token_id, buf, size, 0, True)
        if n >= 0:
            return buf.raw[:n]
        size = -n
