"""The tokenizer authority: which tokenizer the reference side uses, and proof of what it is.

Three sources, in order of precedence:
* external        -- the config names a tokenizer.json (it must exist);
* auto_discovered -- a tokenizer.json sits beside the GGUF;
* gguf_embedded   -- rebuilt from the GGUF's own vocabulary (parity_both.tokenize.rebuild), exactly as
                     llama.cpp tokenizes it, or refused / marked approximate with the reason.

The authority records hashes of the EFFECTIVE tokenizer.json (file bytes, and a canonical form of
what it means), and a fingerprint of the vocabulary as an engine reports it about itself
(VocabDump), so every lane's engine can be compared with the reference independently -- never an
object with itself.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from parity_both.gguf.reader import read_gguf
from parity_both.lanes.base import VocabDump
from parity_both.tokenize.rebuild import rebuild_from_gguf, tokenizer_json
from parity_both.tokenize.reference import ReferenceTokenizer, id_to_text, kinds_from_tokenizer_json
from parity_both.tokenize.tables import LLAMA_CPP_REFERENCE
from parity_both.tokenize.vocab import LlamaVocab, TokenizerBuildError, load_llama_vocab

SOURCES = ("external", "auto_discovered", "gguf_embedded")
MAX_LISTED_DIFFERENCES = 8

# Fixed probe strings: tokenizing them with the external tokenizer.json and with llama.cpp's view
# of the GGUF shows pre-tokenizer disagreements (e.g. a GGUF without tokenizer.ggml.pre) up front.
PROBE_STRINGS = (
    "Hello world",
    " Hello  world\n\n",
    "I've been there, they'll see. DON'T",
    "1234567 89 0.5 3,141",
    "Cửa Việt 你好世界 こんにちは 안녕하세요",
    "emoji 🤗🦙 👍🏽 🇫🇷",
    "def f(x):\n\treturn x**2  # ok\n",
    "   leading and trailing   ",
    "\t\t\r\n\r\n",
    "Ünïcödé ñ ß ø å",
    "ﷺ العربية עברית हिन्दी ไทย",
    "<>{}[]()=>!==&&||",
)


class AuthorityError(ValueError):
    """The configured tokenizer cannot be used; the message says what to fix."""


def detect_source(model_gguf: str, configured_tokenizer_json: str | None) -> tuple[str, str | None]:
    """(source, tokenizer.json path or None) for a model and an optionally configured tokenizer.json."""
    if configured_tokenizer_json:
        p = Path(configured_tokenizer_json)
        if not p.is_file():
            raise AuthorityError(
                f"the configured tokenizer.json {str(p)!r} does not exist; fix the path in the config or "
                "remove the setting to use the tokenizer embedded in the GGUF"
            )
        return "external", str(p)
    beside = Path(model_gguf).parent / "tokenizer.json"
    if beside.is_file():
        return "auto_discovered", str(beside)
    return "gguf_embedded", None


def _sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _canonical(obj: Any) -> bytes:
    # surrogatepass: an engine may report invalid UTF-8 as surrogate escapes; hash it, never crash
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")


def _merge_pairs(merges: Any) -> list[list[str]]:
    # tokenizers writes merges either as "a b" strings (old) or [a, b] pairs (new): one canonical form.
    out = []
    for m in merges or []:
        if isinstance(m, str):
            a, _, b = m.partition(" ")
            out.append([a, b])
        else:
            out.append([str(m[0]), str(m[1])])
    return out


def config_hash(tok_json: dict[str, Any], add_bos: bool, add_eos: bool, bos_id: int | None, eos_id: int | None) -> str:
    """SHA-256 of what the tokenizer means, not of how the file is laid out (and never of a path)."""
    model = dict(tok_json.get("model") or {})
    vocab = model.pop("vocab", None)
    merges = model.pop("merges", None)
    if isinstance(vocab, dict):
        vocab_c: Any = sorted([int(i), t] for t, i in vocab.items())
    else:
        vocab_c = vocab
    added = sorted(
        (
            {k: at.get(k) for k in ("id", "content", "special", "lstrip", "rstrip", "normalized", "single_word")}
            for at in tok_json.get("added_tokens") or []
        ),
        key=lambda d: int(d["id"]),
    )
    canon = {
        "model_options": model,
        "vocab": vocab_c,
        "merges": _merge_pairs(merges),
        "added_tokens": added,
        "pre_tokenizer": tok_json.get("pre_tokenizer"),
        "normalizer": tok_json.get("normalizer"),
        "add_bos": bool(add_bos),
        "add_eos": bool(add_eos),
        "bos_id": bos_id,
        "eos_id": eos_id,
    }
    return _sha256_bytes(_canonical(canon))


def _dump_canon(d: VocabDump) -> dict[str, Any]:
    return {
        "tokens": [[int(i), t, k] for i, t, k in sorted(d.tokens)],
        "bos_id": d.bos_id,
        "eos_id": d.eos_id,
        "add_bos": bool(d.add_bos),
        "add_eos": bool(d.add_eos),
    }


def vocab_fingerprint(d: VocabDump) -> str:
    """Canonical hash of a vocabulary as an engine reports it (ids, texts, kinds, BOS/EOS, add flags)."""
    return _sha256_bytes(_canonical(_dump_canon(d)))


def compare_vocabs(a: VocabDump, b: VocabDump) -> dict[str, Any] | None:
    """None when a and b are the same vocabulary; else where they first differ."""
    if vocab_fingerprint(a) == vocab_fingerprint(b):
        return None
    ta = {int(i): (t, k) for i, t, k in a.tokens}
    tb = {int(i): (t, k) for i, t, k in b.tokens}
    differing = [i for i in sorted(set(ta) | set(tb)) if ta.get(i) != tb.get(i)]
    out: dict[str, Any] = {"size": {"a": len(ta), "b": len(tb)}, "n_token_differences": len(differing)}
    if differing:
        i = differing[0]

        def side(x: tuple[str, str] | None) -> dict[str, str] | None:
            return None if x is None else {"text": x[0], "kind": x[1]}

        out["first_difference"] = {"id": i, "a": side(ta.get(i)), "b": side(tb.get(i))}
    flags = {}
    for name in ("bos_id", "eos_id", "add_bos", "add_eos"):
        va, vb = getattr(a, name), getattr(b, name)
        if va != vb:
            flags[name] = {"a": va, "b": vb}
    if flags:
        out["flags"] = flags
    return out


def _special_facts_from_config(tok_json_path: Path, tok_json: dict[str, Any]) -> dict[str, Any] | None:
    """BOS/EOS facts from a tokenizer_config.json beside an external tokenizer.json, if there is one."""
    cfg_path = tok_json_path.parent / "tokenizer_config.json"
    if not cfg_path.is_file():
        return None
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    text_to_id = {t: i for i, t in id_to_text(tok_json).items()}

    def token_id(key: str) -> int | None:
        val = cfg.get(key)
        if isinstance(val, dict):
            val = val.get("content")
        return text_to_id.get(val) if isinstance(val, str) else None

    return {
        "bos_id": token_id("bos_token"),
        "eos_id": token_id("eos_token"),
        "add_bos": bool(cfg.get("add_bos_token", False)),
        "add_eos": bool(cfg.get("add_eos_token", False)),
        "special_facts_from": str(cfg_path.name),
    }


def _vocab_differences(tok_json: dict[str, Any], lv: LlamaVocab) -> tuple[int, list[dict[str, Any]]]:
    """(number of ids whose text, or special kind, differs; the first MAX_LISTED_DIFFERENCES of them)."""
    texts = id_to_text(tok_json)
    kinds = {i: k for k, ids in kinds_from_tokenizer_json(tok_json).items() for i in ids}
    gguf_kinds = {i: k for i, _t, k in lv.dump().tokens}
    diffs: list[dict[str, Any]] = []
    n_diff = 0
    for i in range(max(len(lv.tokens), max(texts) + 1 if texts else 0)):
        jt = texts.get(i)
        gt = lv.tokens[i] if i < len(lv.tokens) else None
        jk = kinds.get(i, "normal") if jt is not None else None
        gk = gguf_kinds.get(i)
        special_kind = jk in ("control", "user_defined") or gk in ("control", "user_defined")
        if jt != gt or (special_kind and jk != gk):
            n_diff += 1
            if len(diffs) < MAX_LISTED_DIFFERENCES:
                diffs.append(
                    {
                        "id": i,
                        "tokenizer_json": None if jt is None else {"text": jt, "kind": jk},
                        "gguf": None if gt is None else {"text": gt, "kind": gk},
                    }
                )
    return n_diff, diffs


def _tokenization_probe(model_gguf: str, ref: ReferenceTokenizer) -> tuple[dict[str, Any], int]:
    """PROBE_STRINGS tokenized by ref and by llama.cpp's view of the GGUF: (record, number that differ)."""
    try:
        rb = rebuild_from_gguf(model_gguf)
    except TokenizerBuildError as e:
        return {"skipped": str(e)}, 0
    llama_view = ReferenceTokenizer(rb.tokenizer, {})
    probe = []
    for s in PROBE_STRINGS:
        a, b = ref.encode(s, parse_special=False), llama_view.encode(s, parse_special=False)
        if a != b:
            probe.append({"text": s, "tokenizer_json": a, "gguf_llama_cpp": b})
    record = {
        "n_strings": len(PROBE_STRINGS),
        "n_differ": len(probe),
        "first_differences": probe[:3],
        "gguf_fidelity": rb.fidelity["level"],
    }
    return record, len(probe)


def gguf_agreement(tok_json: dict[str, Any], model_gguf: str, ref: ReferenceTokenizer) -> dict[str, Any]:
    """Does an external tokenizer.json describe the same vocabulary (and tokenization) as the GGUF?"""
    try:
        lv = load_llama_vocab(model_gguf)
    except TokenizerBuildError as e:
        return {"agrees": None, "reason": f"the GGUF vocabulary cannot be read llama.cpp's way: {e}"}
    n_diff, diffs = _vocab_differences(tok_json, lv)
    out: dict[str, Any] = {
        "vocab_size": {"tokenizer_json": len(id_to_text(tok_json)), "gguf": len(lv.tokens)},
        "n_differences": n_diff,
        "first_differences": diffs,
    }
    specials = {}
    for name in ("bos_id", "eos_id", "add_bos", "add_eos"):
        jv, gv = getattr(ref, name), getattr(lv, name)
        if jv != gv:
            specials[name] = {"tokenizer_json": jv, "gguf": gv}
    out["special_differences"] = specials
    # Same vocabulary is not enough: llama.cpp's pre-tokenizer for this GGUF may still differ.
    out["tokenization_probe"], n_probe_diff = _tokenization_probe(model_gguf, ref)
    out["agrees"] = n_diff == 0 and not specials and not n_probe_diff
    return out


def _embedded(model_gguf: str, out_path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, list[int]]]:
    """Rebuild the GGUF's vocabulary into out_path: (record fields, special facts, token kinds)."""
    rb = rebuild_from_gguf(model_gguf)
    _atomic_write(out_path, tokenizer_json(rb.tokenizer).encode("utf-8"))
    v = rb.vocab
    facts: dict[str, Any] = {
        "bos_id": v.bos_id,
        "eos_id": v.eos_id,
        "add_bos": v.add_bos,
        "add_eos": v.add_eos,
        "special_facts_from": "gguf (llama.cpp rules)",
        "special_split": "llama.cpp",
    }
    fields = {"path": str(model_gguf), "fidelity": rb.fidelity, "tokenizer_model": v.model, "tokenizer_pre": v.pre}
    return fields, facts, v.token_kinds()


def _gguf_special_facts(model_gguf: str) -> dict[str, Any]:
    """BOS/EOS facts of the GGUF for an external tokenizer.json without a tokenizer_config.json."""
    try:
        lv = load_llama_vocab(model_gguf)
    except TokenizerBuildError:
        return {"bos_id": None, "eos_id": None, "add_bos": False, "add_eos": False, "special_facts_from": "none found"}
    return {
        "bos_id": lv.bos_id,
        "eos_id": lv.eos_id,
        "add_bos": lv.add_bos,
        "add_eos": lv.add_eos,
        "special_facts_from": "gguf (no tokenizer_config.json)",
    }


def _external(
    model_gguf: str, source: str, tokenizer_json_path: str | None, out_path: Path
) -> tuple[dict[str, Any], dict[str, Any], dict[str, list[int]]]:
    """Copy a tokenizer.json to out_path as is: (record fields, special facts, token kinds)."""
    if not tokenizer_json_path or not Path(tokenizer_json_path).is_file():
        raise AuthorityError(f"{source} tokenizer.json {tokenizer_json_path!r} does not exist")
    raw = Path(tokenizer_json_path).read_bytes()
    _atomic_write(out_path, raw)
    tok_json_src = json.loads(raw.decode("utf-8"))
    facts = _special_facts_from_config(Path(tokenizer_json_path), tok_json_src)
    if facts is None:
        facts = _gguf_special_facts(model_gguf)
    md_model, md_pre = _gguf_tokenizer_names(model_gguf)
    fields = {
        "path": str(tokenizer_json_path),
        "fidelity": {
            "level": "exact",
            "reasons": [],
            "note": "the tokenizer.json is used as is; agreement with the GGUF is in gguf_agreement",
            "reference": LLAMA_CPP_REFERENCE,
        },
        "tokenizer_model": md_model,
        "tokenizer_pre": md_pre,
    }
    return fields, facts, kinds_from_tokenizer_json(tok_json_src)


def build_authority(
    model_gguf: str, source: str, tokenizer_json_path: str | None, out_tokenizer_json: str
) -> dict[str, Any]:
    """Write the effective tokenizer.json to out_tokenizer_json and return the authority record."""
    if source not in SOURCES:
        raise AuthorityError(f"unknown tokenizer source {source!r}; expected one of {SOURCES}")
    out_path = Path(out_tokenizer_json)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if source == "gguf_embedded":
        fields, facts, kinds = _embedded(model_gguf, out_path)
    else:
        fields, facts, kinds = _external(model_gguf, source, tokenizer_json_path, out_path)
    raw_effective = out_path.read_bytes()
    tok_json_eff = json.loads(raw_effective.decode("utf-8"))
    facts["token_kinds"] = kinds
    ref = ReferenceTokenizer(Tokenizer.from_str(raw_effective.decode("utf-8")), facts, tok_json_eff)
    record: dict[str, Any] = {
        "source": source,
        "path": fields["path"],
        "fidelity": fields["fidelity"],
        "file_hash": _sha256_bytes(raw_effective),
        "config_hash": config_hash(tok_json_eff, ref.add_bos, ref.add_eos, ref.bos_id, ref.eos_id),
        "vocab_hash": vocab_fingerprint(ref.vocab_dump()),
        "vocab_size": ref.vocab_size,
        "bos_id": ref.bos_id,
        "eos_id": ref.eos_id,
        "add_bos": ref.add_bos,
        "add_eos": ref.add_eos,
        "special_facts_from": facts.get("special_facts_from"),
        "special_split": facts.get("special_split", "tokenizers"),
        "tokenizer_model": fields["tokenizer_model"],
        "tokenizer_pre": fields["tokenizer_pre"],
        "token_kinds": kinds,
    }
    if source != "gguf_embedded":
        record["gguf_agreement"] = gguf_agreement(tok_json_eff, model_gguf, ref)
    return record


def reference_from_authority(authority: dict[str, Any], effective_tokenizer_json: str) -> ReferenceTokenizer:
    """The reference tokenizer an authority record describes."""
    return ReferenceTokenizer.from_files(effective_tokenizer_json, authority)


def _gguf_tokenizer_names(model_gguf: str) -> tuple[str | None, str | None]:
    md = read_gguf(model_gguf).metadata
    return md.get("tokenizer.ggml.model"), md.get("tokenizer.ggml.pre")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def dump_ids_table(ref_ids: list[int], ref_pieces: list[str], lane_ids: list[int], lane_pieces: list[str]) -> str:
    """Side-by-side ids with pieces; the first position where the two sides differ is marked."""
    n = max(len(ref_ids), len(lane_ids))
    first = next((i for i in range(n) if i >= len(ref_ids) or i >= len(lane_ids) or ref_ids[i] != lane_ids[i]), None)
    rows = [("pos", "ref id", "ref piece", "lane id", "lane piece", "")]
    for i in range(n):
        r_id = str(ref_ids[i]) if i < len(ref_ids) else "-"
        r_pc = repr(ref_pieces[i]) if i < len(ref_pieces) and i < len(ref_ids) else ""
        l_id = str(lane_ids[i]) if i < len(lane_ids) else "-"
        l_pc = repr(lane_pieces[i]) if i < len(lane_pieces) and i < len(lane_ids) else ""
        mark = (
            "<-- first divergence" if i == first else ("*" if first is not None and i > first and r_id != l_id else "")
        )
        rows.append((str(i), r_id, r_pc, l_id, l_pc, mark))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    lines = ["  ".join(r[c].ljust(widths[c]) for c in range(5)) + ("  " + r[5] if r[5] else "") for r in rows]
    summary = (
        "identical" if first is None else f"first divergence at position {first}"
    ) + f" (ref {len(ref_ids)} ids, lane {len(lane_ids)} ids)"
    return "\n".join([*lines, summary]) + "\n"
