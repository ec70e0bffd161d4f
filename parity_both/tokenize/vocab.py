"""A GGUF vocabulary read the way llama.cpp 0.3.36 (src/llama-vocab.cpp, llama_vocab::impl::load) reads it.

Token attributes including the end-of-generation pieces llama.cpp forces to CONTROL, BOS/EOS defaults per
tokenizer type, the pre-tokenizer llama.cpp picks for `tokenizer.ggml.pre`, and llama.cpp's exact
end-of-generation (EOG) set. What cannot be matched exactly is refused (`TokenizerBuildError`) or recorded in
the vocabulary's notes; nothing is silently approximated. The rebuild as a `tokenizers.Tokenizer` is in
parity_both.tokenize.rebuild, the reference side's tokenizer in parity_both.tokenize.reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from parity_both.gguf.reader import read_gguf
from parity_both.lanes.base import VocabDump
from parity_both.tokenize.attrs import (
    ATTR_CONTROL,
    ATTR_LSTRIP,
    ATTR_NORMAL,
    ATTR_RSTRIP,
    ATTR_UNDEFINED,
    ATTR_UNKNOWN,
    ATTR_UNUSED,
    ATTR_USER_DEFINED,
    TYPE_TO_ATTR,
    kind_from_attr,
)
from parity_both.tokenize.tables import (
    ALWAYS_RENDERED_TEXTS,
    AUTO_DETECT,
    DEPRECATED_FIM_KEYS,
    EOG_TEXTS,
    LLAMA_CPP_REFERENCE,
    PRE_NAMES,
    RAW_UTF8_PRE_TYPES,
    TOKENIZER_MODELS,
    UNREBUILT_TOKENIZER_MODELS,
    UNSUPPORTED_PRE_TYPES,
)


class TokenizerBuildError(ValueError):
    """A GGUF vocabulary this package cannot rebuild exactly; the message says why and what to do."""


@dataclass
class LlamaVocab:
    """A GGUF vocabulary as llama.cpp loads it (attributes after all of its load-time fix-ups)."""

    path: str
    model: str  # tokenizer.ggml.model
    pre: str | None  # tokenizer.ggml.pre as stored (None when absent)
    vocab_type: str  # "spm" or "bpe" (llama.cpp's LLAMA_VOCAB_TYPE_*)
    pre_type: str  # llama.cpp's LLAMA_VOCAB_PRE_TYPE_* name (DEFAULT for SPM)
    tokens: list[str]
    attrs: list[int]
    scores: list[float] | None
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    ignore_merges: bool
    escape_whitespaces: bool
    byte_encode: bool
    eog_ids: list[int]
    notes: list[str] = field(default_factory=list)  # why the rebuild is not exact (empty = exact)
    # limits of the tokenizer.json used alone (tokenizers' own special-token splitting), which
    # ReferenceTokenizer avoids by splitting special tokens llama.cpp's way
    tokenizer_json_notes: list[str] = field(default_factory=list)

    def dump(self) -> VocabDump:
        """The vocabulary exactly as llama.cpp's API reports it (text, kind per id, BOS/EOS, flags)."""
        return VocabDump(
            tokens=[(i, t, kind_from_attr(a)) for i, (t, a) in enumerate(zip(self.tokens, self.attrs, strict=False))],
            bos_id=self.bos_id,
            eos_id=self.eos_id,
            add_bos=self.add_bos,
            add_eos=self.add_eos,
        )

    def token_kinds(self) -> dict[str, list[int]]:
        """Ids of every non-normal kind (sparse: normal is the default)."""
        out: dict[str, list[int]] = {}
        for i, a in enumerate(self.attrs):
            k = kind_from_attr(a)
            if k != "normal":
                out.setdefault(k, []).append(i)
        return out


def _vocab_type(path: str | os.PathLike[str], model: str | None) -> tuple[str, int | None, int | None, int | None]:
    """(llama.cpp vocab type, default BOS, EOS, UNK) for tokenizer.ggml.model, or a clear refusal."""
    if model is None:
        raise TokenizerBuildError(f"{path}: no tokenizer.ggml.model key; the GGUF has no vocabulary")
    if model in TOKENIZER_MODELS:
        return TOKENIZER_MODELS[model]
    if model in UNREBUILT_TOKENIZER_MODELS:
        raise TokenizerBuildError(
            f"{path}: tokenizer model {model!r} (WPM/UGM/RWKV/...) is not supported by parity-both's "
            "GGUF rebuild; provide the model's tokenizer.json (external source) instead"
        )
    raise TokenizerBuildError(f"{path}: unknown tokenizer model {model!r} (llama.cpp refuses it too)")


def _resolve_pre(model: str, pre: str | None) -> tuple[str, dict[str, bool]]:
    if model == "gemma4":
        return "GEMMA4", {"escape_whitespaces": True}
    if not pre or pre == "default":
        return "DEFAULT", {}
    if pre not in PRE_NAMES:
        raise TokenizerBuildError(
            f"tokenizer.ggml.pre={pre!r} is unknown to {LLAMA_CPP_REFERENCE}; llama.cpp itself refuses "
            "this model ('unknown pre-tokenizer type'); use a newer llama.cpp table or give a tokenizer.json"
        )
    return PRE_NAMES[pre]


def _settings(path: str | os.PathLike[str], md: dict[str, Any], vocab_type: str) -> dict[str, Any]:
    """The pre type and the flags llama.cpp derives from the tokenizer model, tokenizer.ggml.pre and the
    GGUF's own add_* keys (LlamaVocab fields, plus bos_null: the BOS default is dropped)."""
    model, pre = md["tokenizer.ggml.model"], md.get("tokenizer.ggml.pre")
    if vocab_type == "spm":
        s: dict[str, Any] = {
            "pre_type": "DEFAULT",
            "add_space_prefix": True,
            "add_bos": True,
            "bos_null": False,
            "ignore_merges": False,
            "escape_whitespaces": True,
            "byte_encode": False,
        }
    else:
        pre_type, flags = _resolve_pre(model, pre)
        if pre_type in UNSUPPORTED_PRE_TYPES:
            raise TokenizerBuildError(
                f"{path}: pre-tokenizer {pre!r} ({pre_type}) uses {UNSUPPORTED_PRE_TYPES[pre_type]}; "
                "an exact rebuild is not implemented: provide the model's tokenizer.json instead"
            )
        s = {
            "pre_type": pre_type,
            "add_space_prefix": False,
            "add_bos": bool(flags.get("add_bos", False)),
            "bos_null": bool(flags.get("bos_null", False)),
            "ignore_merges": bool(flags.get("ignore_merges", False)),
            "escape_whitespaces": bool(flags.get("escape_whitespaces", False)),
            "byte_encode": pre_type not in RAW_UTF8_PRE_TYPES,
        }
    s["add_space_prefix"] = bool(md.get("tokenizer.ggml.add_space_prefix", s["add_space_prefix"]))
    s["add_bos"] = bool(md.get("tokenizer.ggml.add_bos_token", s["add_bos"]))
    s["add_eos"] = bool(md.get("tokenizer.ggml.add_eos_token", False))
    if s["pre_type"] == "GEMMA4":
        s["add_bos"] = True  # llama.cpp's Gemma 4 workaround
    return s


def _read_tokens(path: str | os.PathLike[str], md: dict[str, Any], notes: list[str]) -> list[str]:
    raw_tokens = md.get("tokenizer.ggml.tokens")
    if not raw_tokens:
        raise TokenizerBuildError(f"{path}: no tokenizer.ggml.tokens array")
    # llama.cpp renames empty pieces so that every piece has a distinct, non-empty text.
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(raw_tokens)]
    if any("\ufffd" in t for t in tokens):
        # U+FFFD is either a real piece or what the GGUF reader made of invalid UTF-8: look at the bytes.
        bad = [i for i, b in enumerate(_raw_token_bytes(path)) if "\ufffd" in tokens[i] and not _valid_utf8(b)]
        if bad:
            notes.append(
                f"{len(bad)} token texts are not valid UTF-8 (first id {bad[0]}); tokenizer.json "
                "cannot hold them, so text that would produce them differs"
            )
    return tokens


def _token_to_id(tokens: list[str], notes: list[str]) -> dict[str, int]:
    # token_to_id: on duplicate texts the LAST id wins, as in llama.cpp's unordered_map assignment.
    text_to_id = {t: i for i, t in enumerate(tokens)}
    if len(text_to_id) != len(tokens):
        notes.append(f"{len(tokens) - len(text_to_id)} duplicate token texts: only the last id of each is reachable")
    return text_to_id


def _special_ids(
    md: dict[str, Any], n: int, defaults: tuple[int | None, int | None, int | None]
) -> dict[str, int | None]:
    """BOS/EOS/UNK: the type's default unless the GGUF names an id in range."""
    out: dict[str, int | None] = {}
    for name, default in zip(("bos", "eos", "unknown"), defaults, strict=True):
        cur = default if default is not None and 0 <= default < n else None
        val = md.get(f"tokenizer.ggml.{name}_token_id")
        if val is not None and 0 <= int(val) < n:
            cur = int(val)
        out["unk_id" if name == "unknown" else f"{name}_id"] = cur
    return out


def load_llama_vocab(path: str | os.PathLike[str]) -> LlamaVocab:
    """Read a GGUF's tokenizer metadata and apply llama.cpp's load-time rules to it."""
    md = read_gguf(path).metadata
    vocab_type, bos, eos, unk = _vocab_type(path, md.get("tokenizer.ggml.model"))
    settings = _settings(path, md, vocab_type)
    if settings.pop("bos_null"):
        bos = None
    notes: list[str] = []
    tokens = _read_tokens(path, md, notes)
    n = len(tokens)
    types = md.get("tokenizer.ggml.token_type")
    attrs = [TYPE_TO_ATTR.get(int(t), ATTR_UNDEFINED) for t in types[:n]] if types else [ATTR_NORMAL] * n
    scores = [float(s) for s in md["tokenizer.ggml.scores"][:n]] if "tokenizer.ggml.scores" in md else None
    merges = list(md.get("tokenizer.ggml.merges") or [])
    if vocab_type == "bpe" and not merges:
        raise TokenizerBuildError(f"{path}: BPE vocabulary without tokenizer.ggml.merges")
    text_to_id = _token_to_id(tokens, notes)
    specials = _special_ids(md, n, (bos, eos, unk))
    eog = apply_llama_cpp_fixups(md, tokens, attrs, text_to_id, specials["eos_id"], notes)
    _apply_strip_attrs(md, tokens, attrs, text_to_id, md.get("tokenizer.ggml.pre"))
    return LlamaVocab(
        path=str(path),
        model=md["tokenizer.ggml.model"],
        pre=md.get("tokenizer.ggml.pre"),
        vocab_type=vocab_type,
        tokens=tokens,
        attrs=attrs,
        scores=scores,
        merges=merges,
        eog_ids=eog,
        notes=notes,
        **specials,
        **settings,
    )


def _valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _raw_token_bytes(path: str | os.PathLike[str]) -> list[bytes]:
    """tokenizer.ggml.tokens as raw bytes (read_gguf decodes them with errors='replace')."""
    from parity_both.gguf.reader import read_string_array_bytes

    return read_string_array_bytes(path, "tokenizer.ggml.tokens")


def _set_ids(md: dict[str, Any], n: int) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for name, (key, _texts) in AUTO_DETECT.items():
        val = None
        for k in (key, DEPRECATED_FIM_KEYS.get(name)):
            if k and md.get(k) is not None and 0 <= int(md[k]) < n:
                val = int(md[k])
        out[name] = val
    return out


def _auto_detect(
    ids: dict[str, int | None], tokens: list[str], attrs: list[int], text_to_id: dict[str, int], notes: list[str]
) -> None:
    """EOT/EOM/FIM ids the GGUF does not name, found by text; the match is forced to CONTROL."""
    for name, (_key, texts) in AUTO_DETECT.items():
        if ids[name] is not None:
            continue
        found = [text_to_id[t] for t in texts if t in text_to_id]
        if not found:
            continue
        # llama.cpp forces only the first match in unordered_map (hash) order, which we cannot
        # reproduce when several candidates exist; the EOT/EOM ones are all forced again below.
        if len(found) > 1 and name.startswith("fim") and any(not attrs[i] & ATTR_CONTROL for i in found):
            notes.append(
                f"several {name} candidates {sorted(tokens[i] for i in found)}: llama.cpp forces "
                "one of them (hash order) to CONTROL; we force all"
            )
        for i in found:
            attrs[i] |= ATTR_CONTROL
        ids[name] = found[0]


def _drop_eog_exceptions(eog: set[int], tokens: list[str], attrs: list[int]) -> None:
    """llama.cpp's exceptions: gpt-oss's <|end|> and PLaMo/Gemma's </s> are not EOG when their
    siblings are (they then become USER_DEFINED / NORMAL)."""
    eog_texts = {tokens[i] for i in eog}
    calls = {"<|call|>", "<|calls|>"} & eog_texts
    if "<|end|>" in eog_texts and (("<|return|>" in eog_texts and calls) or (calls and "<|flush|>" in eog_texts)):
        end_id = next(i for i in eog if tokens[i] == "<|end|>")
        eog.discard(end_id)
        attrs[end_id] = ATTR_USER_DEFINED
    if "</s>" in eog_texts and ({"<|tool_response>", "<|plamo:eos|>"} & eog_texts):
        s_id = next(i for i in eog if tokens[i] == "</s>")
        eog.discard(s_id)
        attrs[s_id] = ATTR_NORMAL


def apply_llama_cpp_fixups(
    md: dict[str, Any],
    tokens: list[str],
    attrs: list[int],
    text_to_id: dict[str, int],
    eos: int | None,
    notes: list[str],
) -> list[int]:
    """The text-based attribute fix-ups llama.cpp applies at load time, in its order; returns the EOG ids
    (what llama_vocab_is_eog reports true for)."""
    ids = _set_ids(md, len(tokens))
    _auto_detect(ids, tokens, attrs, text_to_id, notes)
    # control tokens whose text says "unused" are also UNUSED
    for i, t in enumerate(tokens):
        if attrs[i] & ATTR_CONTROL and "unused" in t:
            attrs[i] |= ATTR_UNUSED
    eog = {i for name in ("fim_pad", "fim_rep", "fim_sep") if (i := ids[name]) is not None}
    for t in EOG_TEXTS:
        if t in text_to_id:
            attrs[text_to_id[t]] |= ATTR_CONTROL
            eog.add(text_to_id[t])
    for t in ALWAYS_RENDERED_TEXTS:
        if t in text_to_id:
            attrs[text_to_id[t]] = ATTR_USER_DEFINED
    eog.update(i for i in (eos, ids["eot"], ids["eom"]) if i is not None)
    _drop_eog_exceptions(eog, tokens, attrs)
    return sorted(eog)


def _apply_strip_attrs(
    md: dict[str, Any], tokens: list[str], attrs: list[int], text_to_id: dict[str, int], pre: str | None
) -> None:
    """Per-model LSTRIP/RSTRIP attributes (they change how text around special tokens is cut)."""
    name = str(md.get("general.name", "")).lower()
    arch = str(md.get("general.architecture", ""))
    special_ids = [i for i, a in enumerate(attrs) if a & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN)]
    if any(s in (pre or "") for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or any(
        s in arch for s in ("nomic-bert-moe", "jina-bert-v3")
    ):
        if "<mask>" in text_to_id:
            attrs[text_to_id["<mask>"]] |= ATTR_LSTRIP
    elif "phi-3" in name or "phi3" in name:
        for i in special_ids:
            attrs[i] |= ATTR_RSTRIP
        if "</s>" in text_to_id:
            attrs[text_to_id["</s>"]] |= ATTR_RSTRIP
        for t in ("<unk>", "<s>", "<|endoftext|>"):
            if t in text_to_id:
                attrs[text_to_id[t]] &= ~ATTR_RSTRIP
    elif "modern-bert" in name and "[MASK]" in text_to_id:
        attrs[text_to_id["[MASK]"]] |= ATTR_LSTRIP
