"""Vocab-only GGUFs that differ from one of llama.cpp's test vocabularies only in tokenizer.ggml.pre.

llama.cpp ships test vocabularies for a few pre-tokenizers only; re-labelling one lets llama.cpp
itself check our rebuild of every other pre-tokenizer regex (the merges then merely fit less well).
"""

from __future__ import annotations

from pathlib import Path

import gguf

from parity_both.gguf.reader import read_gguf


def write_with_pre(base: Path, pre: str, out: Path) -> Path:
    md = read_gguf(base).metadata
    w = gguf.GGUFWriter(str(out), arch=md["general.architecture"])
    for key, val in md.items():
        if key in ("general.architecture", "GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"):
            continue
        if key == "tokenizer.ggml.pre":
            val = pre
        if isinstance(val, list):
            w.add_array(key, val)
        elif isinstance(val, str):
            w.add_string(key, val)
        elif isinstance(val, bool):
            w.add_bool(key, val)
        elif isinstance(val, int):
            w.add_uint32(key, val)
        elif isinstance(val, float):
            w.add_float32(key, val)
    if "tokenizer.ggml.pre" not in md:
        w.add_string("tokenizer.ggml.pre", pre)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
