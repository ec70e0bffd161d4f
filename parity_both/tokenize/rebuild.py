"""A GGUF vocabulary rebuilt as a Hugging Face `tokenizers.Tokenizer` that tokenizes exactly as llama.cpp does.

* `gpt2` (byte-level BPE): BPE(vocab, merges, ignore_merges where llama.cpp sets it), one isolated
  Split per llama.cpp regex, then ByteLevel without its own regex.
* `llama` (SentencePiece-style): BPE with merges derived from the scores and byte fallback, and a
  Prepend/Replace normalizer (not Metaspace, which skips the prefix when text starts with a space).
* `gemma4` (SPM-style BPE on raw UTF-8): Replace normalizer, newline split, BPE with byte fallback.

What cannot be matched exactly is refused (`TokenizerBuildError`, from loading) or recorded in the
returned fidelity notes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from parity_both.tokenize.attrs import ATTR_CONTROL, ATTR_LSTRIP, ATTR_RSTRIP, ATTR_UNKNOWN, ATTR_USER_DEFINED
from parity_both.tokenize.regexes import hf_regex
from parity_both.tokenize.tables import LLAMA_CPP_REFERENCE, PRE_TYPE_REGEXES, byte_level_decoder
from parity_both.tokenize.vocab import LlamaVocab, load_llama_vocab

# Stand-in for a character llama.cpp's BPE cannot encode (see _unknown_stand_in); never a real id.
DROPPED_PIECE = "<parity-both:dropped-by-llama.cpp>"


@dataclass
class Rebuild:
    tokenizer: Tokenizer
    vocab: LlamaVocab
    fidelity: dict[str, Any]  # {"level": "exact"|"approximate", "reasons": [...], "reference": ...}


def _split_merge(word: str) -> tuple[str, str]:
    # llama.cpp: word.find(' ', 1), so a leading space belongs to the first half; no space -> ("", "")
    pos = word.find(" ", 1)
    if pos < 0:
        return "", ""
    return word[:pos], word[pos + 1 :]


def _bpe_merges(v: LlamaVocab, vocab: dict[str, int]) -> list[tuple[str, str]]:
    seen: set[tuple[str, str]] = set()
    merges: list[tuple[str, str]] = []
    no_result = 0
    for word in v.merges:
        pair = _split_merge(word)
        if pair in seen:  # bpe_ranks.emplace keeps the FIRST rank of a duplicated pair
            continue
        seen.add(pair)
        a, b = pair
        if a not in vocab or b not in vocab:
            continue  # llama.cpp can never form a symbol that is not a vocab piece: the merge is dead
        if a + b not in vocab:
            no_result += 1  # llama.cpp merges, then emits the merged symbol's bytes one by one
            continue
        merges.append(pair)
    if no_result:
        v.notes.append(
            f"{no_result} merges produce a piece missing from the vocabulary (llama.cpp merges and "
            "then falls back to single bytes; tokenizers cannot)"
        )
    return merges


def _spm_merges(v: LlamaVocab, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """SentencePiece-BPE as merges: every split of a piece into two pieces, ranked by the piece's score.

    llama.cpp's SPM merges the adjacent pair whose concatenation is the highest-scoring piece (ties:
    leftmost). Ranking all splits of a piece by its score reproduces that; ties between DIFFERENT
    pieces with equal scores are ordered by id, which differs from leftmost-first only when the two
    candidate pairs overlap.
    """
    scores = v.scores or [0.0] * len(v.tokens)
    entries: list[tuple[float, int, int, str, str]] = []
    for piece, pid in vocab.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                entries.append((-scores[pid], pid, k, left, right))
    entries.sort()
    return [(e[3], e[4]) for e in entries]


def _added_tokens(v: LlamaVocab, vocab: dict[str, int]) -> tuple[list[AddedToken], list[AddedToken]]:
    """llama.cpp's cache_special_tokens: CONTROL/UNKNOWN (parse_special only) and USER_DEFINED (always)."""
    special: list[AddedToken] = []
    user: list[AddedToken] = []
    for i, (text, attr) in enumerate(zip(v.tokens, v.attrs, strict=False)):
        if not attr & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN) or vocab.get(text) != i:
            continue
        is_special = bool(attr & (ATTR_CONTROL | ATTR_UNKNOWN))
        tok = AddedToken(
            text,
            special=is_special,
            normalized=False,
            single_word=False,
            lstrip=bool(attr & ATTR_LSTRIP),
            rstrip=bool(attr & ATTR_RSTRIP),
        )
        (special if is_special else user).append(tok)
    if any(a & (ATTR_LSTRIP | ATTR_RSTRIP) for a in v.attrs):
        v.tokenizer_json_notes.append(
            "special tokens with lstrip/rstrip: llama.cpp strips ASCII whitespace only, tokenizers any "
            "Unicode whitespace; ReferenceTokenizer splits special tokens llama.cpp's way (exact)"
        )
    return special, user


def _spm_tokenizer(v: LlamaVocab, vocab: dict[str, int]) -> Tokenizer:
    unk = v.tokens[v.unk_id] if v.unk_id is not None else None
    if any(f"<0x{b:02X}>" not in vocab for b in range(256)):
        v.notes.append(
            "SPM vocabulary without all 256 <0xXX> byte pieces: llama.cpp fails on characters "
            "outside the vocabulary, tokenizers maps them to the unknown piece"
        )
    tok = Tokenizer(models.BPE(vocab, _spm_merges(v, vocab), unk_token=unk, fuse_unk=True, byte_fallback=True))
    norm = [normalizers.Replace(" ", "▁")]
    if v.add_space_prefix:
        # llama.cpp prefixes a space to EVERY text fragment (start, and after each special token);
        # tokenizers normalizes each fragment between added tokens separately: same thing.
        norm.insert(0, normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(norm)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if v.add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    return tok


def _unknown_stand_in(v: LlamaVocab, vocab: dict[str, int]) -> str | None:
    """The unknown piece for a BPE vocabulary that cannot encode every character, else None.

    A character outside the vocabulary (with no byte pieces to fall back on) stays a separate symbol in
    llama.cpp -- a barrier no merge crosses -- and is dropped from the output. tokenizers drops it BEFORE
    merging, so its neighbours could merge. An unknown-token stand-in keeps the barrier; ReferenceTokenizer
    then drops its id (DROPPED_PIECE, an id past the real vocabulary).
    """
    if v.byte_encode:
        missing = [c for c in byte_level_decoder() if c not in vocab]
    else:
        missing = [b for b in (f"<0x{b:02X}>" for b in range(256)) if b not in vocab]
    if not missing:
        return None
    vocab[DROPPED_PIECE] = len(v.tokens)
    if not v.byte_encode and len(missing) < 256:
        v.notes.append(
            f"{len(missing)} of the 256 <0xXX> byte pieces are missing: llama.cpp emits the "
            "byte pieces that exist for an unknown character, tokenizers none"
        )
    return DROPPED_PIECE


def _check_gemma4_newlines(v: LlamaVocab, vocab: dict[str, int], bpe: Any) -> None:
    # llama.cpp takes an all-newline word whole when it is a piece; tokenizers merges it. Same
    # result whenever the merges rebuild each such piece, which is checked here, not assumed.
    wrong = [t for t in vocab if t and set(t) == {"\n"} and [x.id for x in bpe.tokenize(t)] != [vocab[t]]]
    if wrong:
        v.notes.append(
            f"gemma4: {len(wrong)} all-newline pieces are looked up whole by llama.cpp but not rebuilt by the merges"
        )


def _bpe_tokenizer(v: LlamaVocab, vocab: dict[str, int]) -> Tokenizer:
    merges = _bpe_merges(v, vocab)
    unk = _unknown_stand_in(v, vocab)
    tok = Tokenizer(
        models.BPE(
            vocab,
            merges,
            ignore_merges=v.ignore_merges,
            byte_fallback=not v.byte_encode,
            unk_token=unk,
            fuse_unk=False,
        )
    )
    splits: list[Any] = [
        pre_tokenizers.Split(Regex(hf_regex(rx)), behavior="isolated") for rx in PRE_TYPE_REGEXES[v.pre_type]
    ]
    if v.pre_type == "GEMMA4":
        _check_gemma4_newlines(v, vocab, tok.model)
    if v.escape_whitespaces:
        tok.normalizer = normalizers.Replace(" ", "▁")
    if v.byte_encode:
        splits.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False))
        tok.decoder = decoders.ByteLevel()
    else:
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits)
    return tok


def build_tokenizer(v: LlamaVocab) -> Tokenizer:
    """A tokenizers.Tokenizer that tokenizes like llama.cpp does for this vocabulary."""
    vocab: dict[str, int] = {}
    for i, t in enumerate(v.tokens):
        vocab[t] = i  # last id wins, as in llama.cpp's token_to_id
    tok = _spm_tokenizer(v, vocab) if v.vocab_type == "spm" else _bpe_tokenizer(v, vocab)
    special, user = _added_tokens(v, vocab)
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    return tok


def rebuild_from_gguf(path: str | os.PathLike[str]) -> Rebuild:
    """Load a GGUF vocabulary llama.cpp's way and rebuild it; fidelity says whether it is exact."""
    v = load_llama_vocab(path)
    tok = build_tokenizer(v)
    fidelity = {
        "level": "approximate" if v.notes else "exact",
        "reasons": list(v.notes),
        "tokenizer_json_alone": list(v.tokenizer_json_notes),
        "special_split": "llama.cpp",
        "reference": LLAMA_CPP_REFERENCE,
    }
    return Rebuild(tok, v, fidelity)


def tokenizer_from_gguf(path: str | os.PathLike[str]) -> Tokenizer:
    """Exact rebuild of llama.cpp's tokenization of a GGUF vocabulary (see rebuild_from_gguf)."""
    return rebuild_from_gguf(path).tokenizer


def tokenizer_json(tok: Tokenizer) -> str:
    """Deterministic serialization of a tokenizer: tokenizers writes fields in a fixed order, the
    vocabulary by id and added tokens by id, so equal tokenizers give byte-identical files."""
    return tok.to_str(pretty=True) + "\n"
