"""llama-cpp-python as a lane program (``kind: command``): the second engine of issue 15's tests, and a
template for wrapping any Python-callable engine in the lane protocol (docs/lane-protocol.md).

    python -m parity_both.lanes.llama_engine info | vocab | tokenize | eval ...

Evaluation has the `llama` lane's parity settings (parity_both.lanes.llama_cpp_python: F32 K/V, flash
attention off, every position in one batch on a fresh cache, CPU only).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from parity_both.lanes.protocol_server import EXIT_BAD_INPUT, EvalSettings, ProtocolError, VocabRow, serve

_KIND_ATTR = {"unknown": 1, "unused": 2, "normal": 4, "control": 8, "user_defined": 16, "byte": 32, "undefined": 0}


class LlamaCppProgram:
    def info(self) -> dict[str, Any]:
        return {
            "engine": "llama.cpp via llama-cpp-python (command lane)",
            "engine_version": importlib.metadata.version("llama-cpp-python"),
            "capabilities": [],
        }

    def _open(self, model: str, n_ctx: int = 64, threads: int = 1, vocab_only: bool = True) -> Any:
        from parity_both.lanes.llama_cpp_python import LlamaCppPythonLane

        try:
            return LlamaCppPythonLane(model, n_ctx=n_ctx, threads=threads, vocab_only=vocab_only)
        except ValueError as e:  # llama-cpp-python: "Failed to load model from file"
            raise ProtocolError(EXIT_BAD_INPUT, "load_model", f"cannot load model {model}: {e}") from e

    def vocab(self, model: str) -> tuple[list[VocabRow], dict[str, Any]]:
        lane = self._open(model)
        try:
            dump = lane.vocab()
            flags = dump.extra.get("attr_flags") or {}
            lib, vocab = lane._llama_cpp, lane._vocab
            rows = []
            buf = ctypes.create_string_buffer(512)
            for i, text, kind in dump.tokens:
                n = lib.llama_token_to_piece(vocab, i, buf, len(buf), 0, True)
                attr = int(flags.get(i, flags.get(str(i), _KIND_ATTR.get(kind, 0))))
                rows.append(VocabRow(i, attr, kind, text.encode("utf-8", "surrogateescape"), buf.raw[: max(n, 0)]))
        finally:
            lane.close()
        return rows, {
            "bos_id": -1 if dump.bos_id is None else dump.bos_id,
            "eos_id": -1 if dump.eos_id is None else dump.eos_id,
            "add_bos": dump.add_bos,
            "add_eos": dump.add_eos,
        }

    def tokenize(self, model: str, text: str, add_special: bool, parse_special: bool) -> list[int]:
        lane = self._open(model)
        try:
            data = text.encode("utf-8")
            return [int(t) for t in lane.llm.tokenize(data, add_bos=add_special, special=parse_special)] if data else []
        finally:
            lane.close()

    def n_vocab(self, model: str) -> int:
        lane = self._open(model)
        try:
            return int(lane._llama_cpp.llama_vocab_n_tokens(lane._vocab))
        finally:
            lane.close()

    def eval(self, model: str, ids: list[int], settings: EvalSettings) -> tuple[np.ndarray, dict[str, Any]]:
        lane = self._open(model, n_ctx=max(settings.n_ctx, len(ids)), threads=settings.threads, vocab_only=False)
        try:
            return lane.eval_logits(ids), lane.settings()
        finally:
            lane.close()


def main(argv: Sequence[str] | None = None) -> int:
    return serve(LlamaCppProgram, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
