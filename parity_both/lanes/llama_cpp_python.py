"""The `llama` lane: llama.cpp through llama-cpp-python, in the calling process (one Snakemake job).

Parity settings (see notes/llama-cpp.md): F32 K and V cache, flash attention off, one batch covering
the whole sequence (token-by-token evaluation differs by ~5e-5), fixed threads, fresh cache.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
from typing import Any

import numpy as np

from parity_both.lanes.base import VocabDump

GGML_TYPE_F32 = 0

# llama_token_attr bits (llama.h) -> our token kinds, most specific first.
_ATTR_KINDS = ((1 << 0, "unknown"), (1 << 1, "unused"), (1 << 3, "control"), (1 << 4, "user_defined"),
               (1 << 5, "byte"), (1 << 2, "normal"))


def attr_kind(attr: int) -> str:
    for bit, kind in _ATTR_KINDS:
        if attr & bit:
            return kind
    return "undefined"


class LlamaCppPythonLane:
    def __init__(self, model_path: str, *, n_ctx: int, threads: int = 1, vocab_only: bool = False) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.model_path = model_path
        self.n_ctx = max(int(n_ctx), 8)
        self.threads = int(threads)
        self.llm = llama_cpp.Llama(
            model_path=model_path, vocab_only=vocab_only, n_ctx=self.n_ctx, n_batch=self.n_ctx,
            n_ubatch=self.n_ctx, n_threads=self.threads, n_threads_batch=self.threads, logits_all=True,
            type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False, offload_kqv=False, n_gpu_layers=0,
            seed=0, verbose=False,
        )
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)

    # -- identity ----------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        lib_dir = os.path.join(os.path.dirname(self._llama_cpp.__file__), "lib")
        return {
            "engine": "llama.cpp",
            "kind": "python",
            "package": "llama-cpp-python",
            "version": importlib.metadata.version("llama-cpp-python"),
            "api_generation": "2025+",
            "library_dir": lib_dir,
            "system_info": self._llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(),
        }

    def settings(self) -> dict[str, Any]:
        return {
            "threads": self.threads, "n_ctx": self.n_ctx, "n_batch": self.n_ctx, "n_ubatch": self.n_ctx,
            "type_k": "f32", "type_v": "f32", "flash_attn": False, "offload_kqv": False, "n_gpu_layers": 0,
            "logits": "all positions, one batch, fresh cache",
        }

    # -- vocabulary / tokenization -----------------------------------------------------------
    def vocab(self) -> VocabDump:
        # the same reading (and the same text decoding) the reference authority is checked against
        from parity_both.tokenize.vocab import vocab_dump_from_llama_cpp

        dump = vocab_dump_from_llama_cpp(self.llm)
        dump.extra.setdefault("vocab_type", int(self._llama_cpp.llama_vocab_type(self._vocab)))
        return dump

    def tokenize(self, text: str, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        if not data:
            return []
        return [int(t) for t in self.llm.tokenize(data, add_bos=False, special=parse_special)]

    def piece(self, token_id: int) -> str:
        # llama-cpp-python's detokenize drops pieces > 32 bytes: ask llama_token_to_piece directly.
        buf = ctypes.create_string_buffer(256)
        n = self._llama_cpp.llama_token_to_piece(self._vocab, token_id, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", "replace")

    # -- evaluation --------------------------------------------------------------------------
    def eval_logits(self, ids: list[int]) -> np.ndarray:
        if len(ids) > self.n_ctx:
            raise ValueError(f"sequence of {len(ids)} tokens exceeds n_ctx={self.n_ctx}")
        self.llm.reset()
        self.llm._ctx.memory_clear(True) if hasattr(self.llm._ctx, "memory_clear") else None
        self.llm.eval(ids)
        return np.array(self.llm.scores[: self.llm.n_tokens], dtype=np.float32, copy=True)

    def close(self) -> None:
        self.llm.close()
