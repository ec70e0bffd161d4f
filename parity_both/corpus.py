"""Corpus prompts: a text file chunked into windows of N tokens, each teacher-forced from an empty KV cache
like `llama-perplexity --kl-divergence` (position-dependent bugs grow with position)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from parity_both.gguf.reader import read_gguf


def corpus_windows(body: list[int], window: int, windows: int, bos_id: int | None) -> list[list[int]]:
    """`windows` consecutive windows of `window` tokens from a tokenized text, each starting with BOS when the
    vocabulary adds one (llama-perplexity's chunking); the text must be long enough for all of them."""
    from parity_both.pipeline import InputError

    step = window - (1 if bos_id is not None else 0)
    if len(body) < step * windows:
        raise InputError(
            f"the corpus has {len(body)} tokens, fewer than {windows} window(s) of {window} need "
            f"({step * windows}); use a longer text or fewer/smaller windows"
        )
    head = [bos_id] if bos_id is not None else []
    return [head + body[k * step : (k + 1) * step] for k in range(windows)]


def corpus_record(
    gguf_path: str, authority: Mapping[str, Any], tokenizer_json: str, name: str, settings: Mapping[str, Any]
) -> dict[str, Any]:
    """The prompt record of a corpus prompt: the windows' ids back to back and where each window starts."""
    from parity_both.pipeline import InputError
    from parity_both.tokenize.reference import ReferenceTokenizer

    path = Path(settings["corpus"])
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(
            f"corpus {path} of prompt {name!r} cannot be read as UTF-8 text ({e}); point `corpus:` at a UTF-8 text file"
        ) from e
    tok = ReferenceTokenizer.from_files(tokenizer_json, authority)
    ctx = int(read_gguf(gguf_path).arch_key("context_length", 0) or 0)
    window, n = int(settings["window"]), int(settings["windows"])
    if ctx and window > ctx:
        raise InputError(
            f"prompt {name!r}: window {window} is longer than the model's context ({ctx} tokens); "
            f"set a smaller `window`"
        )
    wins = corpus_windows(tok.encode(text, parse_special=False), window, n, tok.bos_id if tok.add_bos else None)
    ids = [i for w in wins for i in w]
    return {
        "prompt": {
            "name": name,
            "corpus": str(path),
            "corpus_sha256": sha256_text(text),
            "window": window,
            "windows": n,
            "text": None,
            "system_prompt": None,
        },
        "template": {
            "requested": "raw",
            "used": "raw",
            "evidence": {"rule": "corpus prompts are raw text"},
            "notes": [],
        },
        "formatted": None,
        "contract": {
            "add_bos": bool(tok.add_bos and tok.bos_id is not None),
            "add_eos": False,
            "parse_special": False,
        },  # per window
        "ids": ids,
        "pieces": [tok.piece(i) for i in ids],
        "n_tokens": len(ids),
        "window_starts": [k * window for k in range(n)],
        "stop_ids": [],
    }


def windows_of(prompt: Mapping[str, Any], ids: list[int]) -> list[list[int]]:
    """The sequences evaluated from an empty cache: one per corpus window, else the whole sequence."""
    starts = list(prompt.get("window_starts") or [0])
    ends = starts[1:] + [len(ids)]
    return [ids[s:e] for s, e in zip(starts, ends, strict=True)]


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
