"""The `llama` lane: llama.cpp through llama-cpp-python, in the calling process (one Snakemake job).

Parity settings (see notes/llama-cpp.md): F32 K and V cache, flash attention off, one batch covering
the whole sequence (token-by-token evaluation differs by ~5e-5), fixed threads, fresh cache.
``use_extra_bufts`` (llama.cpp's weight repacking) is the engine's default unless a caller sets it;
the value used is a recorded setting. ``open_llama`` is the one place a parity ``Llama`` is built
(the lane and the tests' helper both use it).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
from pathlib import Path
from typing import Any

import numpy as np

from parity_both.lanes.base import VocabDump
from parity_both.tokenize.attrs import kind_from_attr

GGML_TYPE_F32 = 0

attr_kind = kind_from_attr  # llama_token_attr bits -> token kind (one definition: tokenize/attrs.py)


def open_llama(
    model_path: str | Path, *, n_ctx: int, threads: int, vocab_only: bool = False, use_extra_bufts: bool | None = None
) -> Any:
    """A llama_cpp.Llama with the parity settings; use_extra_bufts None keeps the engine's default
    (``llm.model_params.use_extra_bufts`` tells what was used)."""
    import llama_cpp

    lib = llama_cpp.llama_cpp
    orig = lib.llama_model_default_params

    def model_params() -> Any:
        p = orig()
        if use_extra_bufts is not None:
            p.use_extra_bufts = bool(use_extra_bufts)
        return p

    lib.llama_model_default_params = model_params
    try:
        return llama_cpp.Llama(
            model_path=str(model_path),
            vocab_only=vocab_only,
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=True,
            type_k=GGML_TYPE_F32,
            type_v=GGML_TYPE_F32,
            flash_attn=False,
            offload_kqv=False,
            n_gpu_layers=0,
            seed=0,
            verbose=False,
        )
    finally:
        lib.llama_model_default_params = orig


class LlamaCppPythonLane:
    def __init__(
        self,
        model_path: str,
        *,
        n_ctx: int,
        threads: int = 1,
        vocab_only: bool = False,
        use_extra_bufts: bool | None = None,
    ) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.model_path = model_path
        self.n_ctx = max(int(n_ctx), 8)
        self.threads = int(threads)
        self.llm = open_llama(
            model_path, n_ctx=self.n_ctx, threads=self.threads, vocab_only=vocab_only, use_extra_bufts=use_extra_bufts
        )
        self.use_extra_bufts = bool(self.llm.model_params.use_extra_bufts)
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)

    # -- identity ----------------------------------------------------------------------------
    def _lib_dir(self) -> str:
        return os.path.join(os.path.dirname(self._llama_cpp.__file__), "lib")

    def identity(self) -> dict[str, Any]:
        return {
            "engine": "llama.cpp",
            "kind": "python",
            "package": "llama-cpp-python",
            "version": importlib.metadata.version("llama-cpp-python"),
            "api_generation": "2025+",
            "library_dir": self._lib_dir(),
            "system_info": self._llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(),
        }

    def settings(self) -> dict[str, Any]:
        return {
            "threads": self.threads,
            "n_ctx": self.n_ctx,
            "n_batch": self.n_ctx,
            "n_ubatch": self.n_ctx,
            "type_k": "f32",
            "type_v": "f32",
            "flash_attn": False,
            "offload_kqv": False,
            "n_gpu_layers": 0,
            "use_extra_bufts": self.use_extra_bufts,
            "logits": "all positions, one batch, fresh cache",
        }

    # -- vocabulary / tokenization -----------------------------------------------------------
    def vocab(self) -> VocabDump:
        # the same reading (and the same text decoding) the reference authority is checked against
        from parity_both.tokenize.llama_cpp import vocab_dump_from_llama_cpp

        dump = vocab_dump_from_llama_cpp(self.llm)
        dump.extra.setdefault("vocab_type", int(self._llama_cpp.llama_vocab_type(self._vocab)))
        return dump

    def specials(self) -> VocabDump:
        """BOS/EOS ids and add flags as vocab() reports them, without listing the tokens (what a prompt's
        contract needs; listing the vocabulary costs a lane job a quarter of a second)."""
        lib, v = self._llama_cpp, self._vocab

        def tid(x: int) -> int | None:
            return None if x < 0 else int(x)

        return VocabDump(
            [],
            tid(lib.llama_vocab_bos(v)),
            tid(lib.llama_vocab_eos(v)),
            bool(lib.llama_vocab_get_add_bos(v)),
            bool(lib.llama_vocab_get_add_eos(v)),
        )

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
        self._check_length(ids)
        self.llm.reset()
        self.llm._ctx.memory_clear(True) if hasattr(self.llm._ctx, "memory_clear") else None
        self.llm.eval(ids)
        return np.array(self.llm.scores[: self.llm.n_tokens], dtype=np.float32, copy=True)

    def eval_capture(self, ids: list[int], out_prefix: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
        """Logits as eval_logits, from one decode that records every graph node; writes
        {out_prefix}.npz + {out_prefix}.json (lanes/capture.py).

        The decode runs on a second context of the same model, created from a copy of the lane's
        own context parameters plus ``cb_eval`` (the lane's context never has a callback), with the
        batch the C++ harness builds: every id at positions 0..n-1, one sequence, every position an
        output."""
        from parity_both.lanes.capture import write_capture
        from parity_both.lanes.ggml_ctypes import CaptureRecorder, load_ggml_base

        self._check_length(ids)
        lib = self._llama_cpp
        rec = CaptureRecorder(load_ggml_base(self._lib_dir()), lib.ggml_backend_sched_eval_callback)
        params = type(self.llm.context_params).from_buffer_copy(self.llm.context_params)
        params.cb_eval, params.cb_eval_user_data = rec.callback, None
        ctx = lib.llama_init_from_model(self.llm.model, params)
        if not ctx:
            raise RuntimeError("llama_init_from_model refused the capture context")
        try:
            logits = self._decode_all(ctx, ids, rec)
        finally:
            lib.llama_free(ctx)
        if rec.error is not None:
            raise RuntimeError(f"capture failed: {rec.error!r}") from rec.error
        engine = f"llama.cpp via llama-cpp-python {importlib.metadata.version('llama-cpp-python')}"
        index = write_capture(
            out_prefix, engine=engine, n_tokens=len(ids), nodes=rec.nodes, leaves=rec.leaves, data=rec.data
        )
        return logits, index

    def _decode_all(self, ctx: Any, ids: list[int], rec: Any) -> np.ndarray:
        lib = self._llama_cpp
        n = len(ids)
        n_vocab = lib.llama_vocab_n_tokens(self._vocab)
        batch = lib.llama_batch_init(n, 0, 1)
        try:
            for i, tok in enumerate(ids):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = int(tok), i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, True
            batch.n_tokens = n
            rec.active = True
            rc = lib.llama_decode(ctx, batch)
            rec.active = False
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            rows = [np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, i), shape=(n_vocab,)) for i in range(n)]
            return np.array(rows, dtype=np.float32)
        finally:
            lib.llama_batch_free(batch)

    def _check_length(self, ids: list[int]) -> None:
        if len(ids) > self.n_ctx:
            raise ValueError(f"sequence of {len(ids)} tokens exceeds n_ctx={self.n_ctx}")

    def close(self) -> None:
        self.llm.close()
