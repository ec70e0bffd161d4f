"""The NumPy reference as a lane program (``kind: command``): it proves the protocol plumbing, not an
engine - its receipts against the reference itself show NMSE 0 where both evaluate the same sequence
the same way (a prompt evaluated in one batch: ``max_tokens: 0``).

    python -m parity_both.lanes.reference_engine [--mode exact|ggml] [--activation silu|relu2|gelu]
        info | vocab | tokenize | eval ...      (docs/lane-protocol.md)

Options before the subcommand configure the engine (they are part of the backend's ``command``).
Tokenization is the reference tokenizer's (parity_both.tokenize), rebuilt from the GGUF once per model
file and cached under the parity-both cache.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parity_both.lanes.protocol_server import (
    EXIT_BAD_INPUT,
    EXIT_USAGE,
    EvalSettings,
    ProtocolError,
    VocabRow,
    serve,
)

ENGINE = "parity-both numpy reference (command lane)"
_KIND_ATTR = {"unknown": 1, "unused": 2, "normal": 4, "control": 8, "user_defined": 16, "byte": 32, "undefined": 0}


def source_digest() -> str:
    """SHA-256 over the reference's sources and this program: the engine's revision (info)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for p in sorted([*(root / "reference").glob("*.py"), Path(__file__)]):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


class ReferenceProgram:
    def __init__(self, mode: str = "exact", activation: str | None = None) -> None:
        if mode not in ("exact", "ggml"):
            raise ProtocolError(EXIT_USAGE, "args", f"--mode must be exact or ggml, not {mode!r}")
        self.mode, self.activation = mode, activation
        self._tokenizers: dict[str, Any] = {}
        self._n_vocab: dict[str, int] = {}

    def info(self) -> dict[str, Any]:
        return {
            "engine": ENGINE,
            "engine_version": source_digest()[:16],
            "mode": self.mode,
            "activation": self.activation,
            "numpy": np.__version__,
            "capabilities": [],
        }

    def tokenizer(self, model: str) -> Any:
        if model not in self._tokenizers:
            self._tokenizers[model] = _reference_tokenizer(model)
        return self._tokenizers[model]

    def vocab(self, model: str) -> tuple[list[VocabRow], dict[str, Any]]:
        tok = self.tokenizer(model)
        dump = tok.vocab_dump()
        rows = [
            VocabRow(i, _KIND_ATTR.get(k, 0), k, t.encode("utf-8", "surrogateescape"), tok.piece_bytes(i))
            for i, t, k in dump.tokens
        ]
        meta = {
            "bos_id": -1 if dump.bos_id is None else dump.bos_id,
            "eos_id": -1 if dump.eos_id is None else dump.eos_id,
            "add_bos": dump.add_bos,
            "add_eos": dump.add_eos,
        }
        return rows, meta

    def tokenize(self, model: str, text: str, add_special: bool, parse_special: bool) -> list[int]:
        tok = self.tokenizer(model)
        ids = tok.encode(text, parse_special=parse_special)
        if add_special and tok.add_bos and tok.bos_id is not None:
            ids = [tok.bos_id, *ids]
        if add_special and tok.add_eos and tok.eos_id is not None:
            ids = [*ids, tok.eos_id]
        return ids

    def n_vocab(self, model: str) -> int:
        if model not in self._n_vocab:
            from parity_both.gguf.reader import GGUFError, read_gguf

            try:
                g = read_gguf(model)
            except GGUFError as e:
                raise ProtocolError(EXIT_BAD_INPUT, "load_model", f"cannot load model {model}: {e}") from e
            tokens = g.metadata.get("tokenizer.ggml.tokens")
            self._n_vocab[model] = len(tokens) if isinstance(tokens, list) else int(g.arch_key("vocab_size"))
        return self._n_vocab[model]

    def eval(self, model: str, ids: list[int], settings: EvalSettings) -> tuple[np.ndarray, dict[str, Any]]:
        from parity_both.reference import run_reference

        res = run_reference(model, ids, 0, mode=self.mode, activation=self.activation)
        used = {
            "threads": settings.threads,
            "n_ctx": len(ids),
            "n_batch": len(ids),
            "n_ubatch": len(ids),
            "type_k": "f32",
            "type_v": "f32",
            "flash_attn": False,
            "one_batch": True,
            "threads_note": "the reference is single-threaded NumPy (BLAS threads: "
            f"{res.settings.get('numpy', {}).get('blas_threads')})",
        }
        return np.asarray(res.logits, dtype=np.float32), used


def _reference_tokenizer(model: str) -> Any:
    """The reference tokenizer of a GGUF (its authority rebuilt once per file content, then cached)."""
    from parity_both.gguf.reader import GGUFError
    from parity_both.hashing import cache_dir, sha256_cached
    from parity_both.tokenize.authority import build_authority
    from parity_both.tokenize.reference import ReferenceTokenizer

    digest, _ = sha256_cached(model)
    d = cache_dir() / "command-lanes" / "reference-tokenizers"
    tok_json, auth_json = d / f"{digest}.tokenizer.json", d / f"{digest}.authority.json"
    if not (tok_json.is_file() and auth_json.is_file()):
        d.mkdir(parents=True, exist_ok=True)
        try:
            authority = build_authority(model, "gguf_embedded", None, str(tok_json))
        except (GGUFError, OSError, ValueError) as e:
            raise ProtocolError(EXIT_BAD_INPUT, "load_model", f"cannot read the vocabulary of {model}: {e}") from e
        tmp = auth_json.with_suffix(".tmp")
        tmp.write_text(json.dumps(authority, sort_keys=True))
        tmp.replace(auth_json)
    return ReferenceTokenizer.from_files(tok_json, json.loads(auth_json.read_text()))


def split_engine_args(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """(engine options given before the subcommand, the request)."""
    argv, opts = list(argv), {}
    while len(argv) >= 2 and argv[0].startswith("--"):
        opts[argv[0][2:]] = argv[1]
        argv = argv[2:]
    return opts, argv


def main(argv: Sequence[str] | None = None) -> int:
    opts, request = split_engine_args(sys.argv[1:] if argv is None else argv)
    return serve(lambda: ReferenceProgram(opts.get("mode", "exact"), opts.get("activation")), request)


if __name__ == "__main__":
    sys.exit(main())
