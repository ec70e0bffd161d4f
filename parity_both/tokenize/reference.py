"""The reference side's tokenizer: an effective tokenizer.json plus the authority's facts, tokenizing and
rendering pieces exactly as llama.cpp does (special tokens split out llama.cpp's way)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from parity_both.lanes.base import VocabDump
from parity_both.tokenize.attrs import (
    ATTR_BYTE,
    ATTR_CONTROL,
    ATTR_NORMAL,
    ATTR_UNKNOWN,
    ATTR_USER_DEFINED,
    kind_from_attr,
)
from parity_both.tokenize.rebuild import DROPPED_PIECE
from parity_both.tokenize.tables import byte_level_decoder
from parity_both.tokenize.vocab import TokenizerBuildError, apply_llama_cpp_fixups, load_llama_vocab


def _is_byte_level(tok_json: dict[str, Any]) -> bool:
    def walk(node: Any) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False

    return walk(tok_json.get("pre_tokenizer")) or walk(tok_json.get("decoder"))


def _prepends_space(tok_json: dict[str, Any]) -> bool:
    """Whether the normalizer/pre-tokenizer adds a SentencePiece prefix space (decode removes it)."""

    def walk(node: Any) -> bool:
        if isinstance(node, dict):
            if node.get("type") == "Prepend" and node.get("prepend") == "▁":
                return True
            if node.get("type") == "Metaspace" and (
                node.get("add_prefix_space") or node.get("prepend_scheme") in ("always", "first")
            ):
                return True
            return any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False

    return walk(tok_json.get("normalizer")) or walk(tok_json.get("pre_tokenizer"))


def _llama_cpp_attrs(tok_json: dict[str, Any], eos_id: int | None) -> tuple[list[int], list[int]]:
    """(attribute per id, EOG ids) of an HF tokenizer.json as llama.cpp would load it after conversion to GGUF.

    Mirrors convert_hf_to_gguf (special added -> CONTROL, other added -> USER_DEFINED, <0xXX> with
    byte fallback -> BYTE, the unk piece -> UNKNOWN) plus llama.cpp's load-time fix-ups.
    """
    id_to_text_ = id_to_text(tok_json)
    n = max(id_to_text_) + 1 if id_to_text_ else 0
    tokens = [id_to_text_.get(i, f"[EMPTY_{i}]") for i in range(n)]
    attrs = [ATTR_NORMAL] * n
    model = tok_json.get("model") or {}
    unk = model.get("unk_token")
    for i, t in enumerate(tokens):
        if model.get("byte_fallback") and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            attrs[i] = ATTR_BYTE
        if unk is not None and t == unk:
            attrs[i] = ATTR_UNKNOWN
    for at in tok_json.get("added_tokens") or []:
        i = int(at["id"])
        if 0 <= i < n:
            attrs[i] = ATTR_CONTROL if at.get("special") else ATTR_USER_DEFINED
    text_to_id = {t: i for i, t in enumerate(tokens)}
    eog = apply_llama_cpp_fixups({}, tokens, attrs, text_to_id, eos_id, [])
    return attrs, eog


def kinds_from_tokenizer_json(tok_json: dict[str, Any]) -> dict[str, list[int]]:
    """Token kinds of an HF tokenizer.json as llama.cpp would report them after conversion to GGUF."""
    out: dict[str, list[int]] = {}
    for i, a in enumerate(_llama_cpp_attrs(tok_json, None)[0]):
        k = kind_from_attr(a)
        if k != "normal":
            out.setdefault(k, []).append(i)
    return out


def _all_id_to_text(tok_json: dict[str, Any]) -> dict[int, str]:
    model = tok_json.get("model") or {}
    vocab = model.get("vocab") or {}
    out: dict[int, str] = {}
    if isinstance(vocab, dict):
        out.update({int(i): t for t, i in vocab.items()})
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        out.update({i: e[0] for i, e in enumerate(vocab)})
    for at in tok_json.get("added_tokens") or []:
        out[int(at["id"])] = at["content"]
    return out


def id_to_text(tok_json: dict[str, Any]) -> dict[int, str]:
    """id -> piece text of a tokenizer.json (without our DROPPED_PIECE stand-in)."""
    return {i: t for i, t in _all_id_to_text(tok_json).items() if t != DROPPED_PIECE}


_C_SPACE = " \t\n\v\f\r"  # C isspace(): what llama.cpp's lstrip/rstrip remove


def _special_cache(tok_json: dict[str, Any], dropped: set[int]) -> list[tuple[int, str, bool, bool, bool]]:
    """llama.cpp's cache_special_tokens order (longest text first, then id): (id, text, skipped as plain
    text unless parse_special, lstrip, rstrip)."""
    cache = []
    for at in tok_json.get("added_tokens") or []:
        i = int(at["id"])
        if i in dropped:
            continue
        skip_plain = bool(at.get("special"))  # CONTROL/UNKNOWN pieces (see rebuild._added_tokens)
        text = at["content"]
        cache.append((-len(text.encode("utf-8")), i, text, skip_plain, bool(at.get("lstrip")), bool(at.get("rstrip"))))
    return [c[1:] for c in sorted(cache)]


class ReferenceTokenizer:
    """What the pipeline's reference side tokenizes with: an effective tokenizer.json + authority facts.

    encode() never adds BOS/EOS (lanes.base.apply_contract does, by id). parse_special=False
    tokenizes control-token text as plain text while user-defined tokens are still split out, as
    llama.cpp does (tokenizers' encode_special_tokens switch has exactly that meaning).
    """

    def __init__(self, tokenizer: Tokenizer, facts: dict[str, Any], tok_json: dict[str, Any] | None = None):
        self._json = tok_json if tok_json is not None else json.loads(tokenizer.to_str())
        self._tok = tokenizer
        self._tok.no_truncation()
        self._tok.no_padding()
        self.facts = dict(facts)
        self.bos_id: int | None = facts.get("bos_id")
        self.eos_id: int | None = facts.get("eos_id")
        self.add_bos: bool = bool(facts.get("add_bos", False))
        self.add_eos: bool = bool(facts.get("add_eos", False))
        self._id_to_text = id_to_text(self._json)
        self._dropped = {i for i, t in _all_id_to_text(self._json).items() if t == DROPPED_PIECE}
        self._strip_leading_space = _prepends_space(self._json)
        kinds = facts.get("token_kinds")
        if kinds is None:
            kinds = kinds_from_tokenizer_json(self._json)
        self._kind: dict[int, str] = {int(i): k for k, ids in kinds.items() for i in ids}
        self._byte_level = _is_byte_level(self._json)
        # For a vocabulary rebuilt from a GGUF, split special tokens out of the text with llama.cpp's
        # own algorithm (tokenizer_st_partition: longest token first, ASCII-only lstrip/rstrip)
        # rather than tokenizers' (leftmost-longest, Unicode whitespace).
        self._llama_split = facts.get("special_split") == "llama.cpp"
        self._special_cache = _special_cache(self._json, self._dropped)

    @classmethod
    def from_files(cls, tokenizer_json_path: str | os.PathLike[str], authority: dict[str, Any]) -> ReferenceTokenizer:
        text = Path(tokenizer_json_path).read_text(encoding="utf-8")
        return cls(Tokenizer.from_str(text), authority, json.loads(text))

    @property
    def vocab_size(self) -> int:
        return max(self._id_to_text) + 1 if self._id_to_text else 0

    def encode(self, text: str, parse_special: bool) -> list[int]:
        if self._llama_split:
            ids: list[int] = []
            self._tok.encode_special_tokens = True  # fragments hold no special token to find
            for frag in self._partition(text, parse_special):
                if isinstance(frag, int):
                    ids.append(frag)
                else:
                    ids.extend(self._tok.encode(frag, add_special_tokens=False).ids)
        else:
            # encode_special_tokens=True: special (control) token text is tokenized as plain text
            self._tok.encode_special_tokens = not parse_special
            ids = self._tok.encode(text, add_special_tokens=False).ids
        return [i for i in ids if i not in self._dropped] if self._dropped else list(ids)

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """llama.cpp's tokenizer_st_partition: raw-text fragments and special-token ids, in order."""
        frags: list[str | int] = [text] if text else []
        for tid, ttext, skip_plain, lstrip, rstrip in self._special_cache:
            if skip_plain and not parse_special:
                continue  # control/unknown text stays plain text; user-defined is always split out
            out: list[str | int] = []
            for frag in frags:
                if isinstance(frag, int) or ttext not in frag:
                    out.append(frag)
                    continue
                pos = 0
                while (m := frag.find(ttext, pos)) >= 0:
                    left = frag[pos:m]
                    if lstrip:
                        left = left.rstrip(_C_SPACE)
                    if left:
                        out.append(left)
                    out.append(tid)
                    pos = m + len(ttext)
                    if rstrip:
                        while pos < len(frag) and frag[pos] in _C_SPACE:
                            pos += 1
                if pos < len(frag):
                    out.append(frag[pos:])
            frags = out
        return frags

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids as llama.cpp renders them (token_to_piece(special=True), concatenated; the
        SentencePiece prefix space of the first piece removed), invalid UTF-8 replaced."""
        data = b"".join(self.piece_bytes(i) for i in ids)
        if self._strip_leading_space and data.startswith(b" "):
            data = data[1:]
        return data.decode("utf-8", errors="replace")

    def kind(self, token_id: int) -> str:
        return self._kind.get(token_id, "normal")

    def piece_bytes(self, token_id: int) -> bytes:
        """The bytes llama.cpp's token_to_piece(special=True) renders for one id."""
        text = self._id_to_text.get(token_id)
        if text is None:
            return b""
        kind = self.kind(token_id)
        if kind in ("control", "unknown", "user_defined"):
            return text.encode("utf-8")
        if kind == "byte" and len(text) == 6 and text.startswith("<0x"):
            return bytes([int(text[3:5], 16)])
        if kind != "normal":
            return b""  # llama.cpp renders unused/undefined pieces as nothing
        if self._byte_level:
            table = byte_level_decoder()
            out = bytearray()
            for c in text:
                if c in table:
                    out.append(table[c])
                else:  # llama_decode_text's marker for a character outside the byte alphabet
                    out += f"[UNK_BYTE_0x{c.encode('utf-8').hex()}".encode() + text.encode("utf-8") + b"]"
            return bytes(out)
        return text.replace("▁", " ").encode("utf-8")

    def eog_ids(self) -> list[int]:
        """llama.cpp's end-of-generation rules applied to this tokenizer's own vocabulary."""
        return _llama_cpp_attrs(self._json, self.eos_id)[1]

    def piece(self, token_id: int) -> str:
        """Readable piece (invalid UTF-8 fragments shown as \\xNN)."""
        return self.piece_bytes(token_id).decode("utf-8", errors="backslashreplace")

    def vocab_dump(self) -> VocabDump:
        n = self.vocab_size
        tokens = [(i, self._id_to_text.get(i, f"[EMPTY_{i}]"), self.kind(i)) for i in range(n)]
        return VocabDump(
            tokens=tokens, bos_id=self.bos_id, eos_id=self.eos_id, add_bos=self.add_bos, add_eos=self.add_eos
        )


def stop_ids(gguf_path: str | os.PathLike[str], ref: ReferenceTokenizer) -> list[int]:
    """The ids greedy decoding stops on: llama.cpp's end-of-generation set for the GGUF (llama_vocab_is_eog),
    the one every llama.cpp lane uses. A GGUF whose vocabulary cannot be read llama.cpp's way here (a WPM/UGM
    vocabulary given with an external tokenizer.json) gets the same rules applied to the reference's vocabulary.
    """
    try:
        return load_llama_vocab(gguf_path).eog_ids
    except TokenizerBuildError:
        return ref.eog_ids()
