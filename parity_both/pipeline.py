"""One function per workflow step. Scripts under scripts/ only read the `snakemake` object and call
these, so every step can be tested (and reused by the CLI) without Snakemake."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from parity_both.gguf.reader import read_gguf
from parity_both.receipt import write_json

log = logging.getLogger("parity_both")

class InputError(ValueError):
    """Unusable input (broken GGUF, bad tokenizer, bad prompt): one clear line, exit code 2."""


# -- model facts ------------------------------------------------------------------------------
def model_facts(gguf_path: str) -> dict[str, Any]:
    from parity_both.hashing import sha256_cached
    from parity_both.tokenize.templates import chat_template_hash

    g = read_gguf(gguf_path)
    md = g.metadata
    tokens = md.get("tokenizer.ggml.tokens")
    digest, reused = sha256_cached(gguf_path)
    p = Path(gguf_path)
    facts = {
        "path": str(p.resolve()),
        "file_name": p.name,
        "size_bytes": p.stat().st_size,
        "sha256": digest,
        "gguf_version": g.version,
        "architecture": g.architecture,
        "name": md.get("general.name"),
        "file_type": md.get("general.file_type"),
        "quant_types": g.type_counts(),
        "n_tensors": len(g.tensors),
        "type_numbering": g.type_numbering,
        "type_numbering_reason": g.type_numbering_reason,
        "context_length": g.arch_key("context_length"),
        "embedding_length": g.arch_key("embedding_length"),
        "block_count": g.arch_key("block_count"),
        "head_count": g.arch_key("attention.head_count"),
        "head_count_kv": g.arch_key("attention.head_count_kv"),
        "vocab_size": len(tokens) if isinstance(tokens, list) else g.arch_key("vocab_size"),
        "tokenizer_model": md.get("tokenizer.ggml.model"),
        "tokenizer_pre": md.get("tokenizer.ggml.pre"),
        "add_bos": md.get("tokenizer.ggml.add_bos_token"),
        "add_eos": md.get("tokenizer.ggml.add_eos_token"),
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
        "chat_template_sha256": chat_template_hash(md),
    }
    log.info("sha256 %s (%s)", digest, "reused from cache" if reused else "computed")
    return facts


# -- tokenizer authority ----------------------------------------------------------------------
def authority_record(gguf_path: str, source: str, tokenizer_json: str | None, out_tokenizer: str) -> dict[str, Any]:
    from parity_both.tokenize.authority import build_authority

    try:
        return build_authority(gguf_path, source, tokenizer_json, out_tokenizer)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise InputError(_bad_tokenizer(source, tokenizer_json, e)) from e
    except Exception as e:  # the tokenizers library raises bare Exceptions for malformed files
        if type(e) is Exception:
            raise InputError(_bad_tokenizer(source, tokenizer_json, e)) from e
        raise


def _bad_tokenizer(source: str, path: str | None, e: BaseException) -> str:
    what = f"tokenizer {path}" if path else "the GGUF's embedded vocabulary"
    fix = ("fix the file or remove models.<name>.tokenizer from config to use the GGUF's own vocabulary"
           if path else "use a GGUF converted by a current llama.cpp, or name a tokenizer.json in config")
    return f"{what} ({source}) cannot be used: {str(e).splitlines()[0] if str(e) else type(e).__name__}; {fix}"


# -- prompt -----------------------------------------------------------------------------------
def prompt_record(gguf_path: str, authority: Mapping[str, Any], tokenizer_json: str, name: str,
                  settings: Mapping[str, Any]) -> dict[str, Any]:
    from parity_both.lanes.base import apply_contract
    from parity_both.tokenize import templates
    from parity_both.tokenize.reference import ReferenceTokenizer
    from parity_both.tokenize.reference import stop_ids as eog_stop_ids

    md = read_gguf(gguf_path).metadata
    requested = settings.get("template") or "auto"
    if requested == "auto":
        used, evidence = templates.detect(md, gguf_path)
    else:
        used, evidence = requested, {"rule": "configured"}
    tok = ReferenceTokenizer.from_files(tokenizer_json, authority)
    bos_text = tok.piece(tok.bos_id) if tok.bos_id is not None else None
    fp = templates.format_prompt(used, settings["text"], settings.get("system_prompt"), md,
                                 vocab_add_bos=tok.add_bos, vocab_add_eos=tok.add_eos, bos_text=bos_text)
    body = tok.encode(fp.text, parse_special=fp.contract.parse_special)
    ids = apply_contract(body, fp.contract, tok.bos_id, tok.eos_id)
    if len(ids) >= 2 and tok.bos_id is not None and ids[0] == ids[1] == tok.bos_id:
        raise InputError(f"prompt {name!r}: the token ids begin with two BOS tokens ({tok.bos_id}); the template "
                         f"text already contains BOS - use a template without it or set the prompt's template")
    if not ids:
        raise InputError(f"prompt {name!r} tokenizes to no tokens; give it some text")
    stop_ids = eog_stop_ids(gguf_path, tok)  # llama.cpp's end-of-generation set (tokenize.reference)
    return {
        "prompt": {"name": name, "text": settings["text"], "system_prompt": settings.get("system_prompt")},
        "template": {"requested": requested, "used": used, "evidence": evidence, "notes": list(fp.notes)},
        "formatted": fp.text,
        "contract": fp.contract.as_dict(),
        "ids": ids,
        "pieces": [tok.piece(i) for i in ids],
        "n_tokens": len(ids),
        "stop_ids": stop_ids,
    }


# -- reference --------------------------------------------------------------------------------
def reference_logits(gguf_path: str, prompt: Mapping[str, Any], max_tokens: int, mode: str,
                     activation: str | None, out_npz: str, prepared_dir: str | None = None) -> dict[str, Any]:
    from parity_both.reference import run_reference

    res = run_reference(gguf_path, list(prompt["ids"]), int(max_tokens), mode=mode, activation=activation,
                        stop_ids=prompt.get("stop_ids") or (), prepared_dir=prepared_dir)
    settings = dict(res.settings)
    settings.update(max_tokens=int(max_tokens), stop_ids=list(prompt.get("stop_ids") or []))
    save_npz(out_npz, logits=np.asarray(res.logits, dtype=np.float32), ids=np.asarray(res.ids, dtype=np.int64),
             n_prompt=np.int64(res.n_prompt), settings=json.dumps(settings, sort_keys=True),
             timings=json.dumps(res.timings, sort_keys=True))
    return {"n_tokens": len(res.ids), "timings": res.timings}


def load_reference(path: str) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as z:
        return {"logits": z["logits"], "ids": [int(i) for i in z["ids"]], "n_prompt": int(z["n_prompt"]),
                "settings": json.loads(str(z["settings"])), "timings": json.loads(str(z["timings"]))}


# -- lanes ------------------------------------------------------------------------------------
def open_lane(backend: Mapping[str, Any], model_path: str, n_ctx: int, threads: int, vocab_only: bool = False):
    kind = backend.get("kind")
    if kind == "python":
        from parity_both.lanes.llama_cpp_python import LlamaCppPythonLane

        return LlamaCppPythonLane(model_path, n_ctx=n_ctx, threads=threads, vocab_only=vocab_only)
    if kind == "harness":
        from parity_both.lanes.harness import HarnessLane

        return HarnessLane.from_backend(backend, model_path, n_ctx=n_ctx, threads=threads)
    raise InputError(f"backend record has unknown kind {kind!r}; rebuild it with `snakemake -R backend`")


def lane_vocab(backend: Mapping[str, Any], model_path: str) -> dict[str, Any]:
    from parity_both.tokenize.authority import vocab_fingerprint

    engine = open_lane(backend, model_path, n_ctx=64, threads=1, vocab_only=True)
    try:
        dump = engine.vocab()
    finally:
        engine.close()
    return {
        "vocab_hash": vocab_fingerprint(dump),
        "vocab_size": len(dump.tokens),
        "bos_id": dump.bos_id, "eos_id": dump.eos_id, "add_bos": dump.add_bos, "add_eos": dump.add_eos,
        "source": f"{backend.get('engine')} API ({backend.get('lane')})",
        "tokens": [[i, t, k] for i, t, k in dump.tokens],
    }


def compare_ids(ref_ids: list[int], ref_pieces: list[str], lane_ids: list[int], lane_pieces: list[str]) -> dict:
    n = min(len(ref_ids), len(lane_ids))
    first = next((i for i in range(n) if ref_ids[i] != lane_ids[i]), None)
    if first is None and len(ref_ids) != len(lane_ids):
        first = n
    out: dict[str, Any] = {"match": first is None, "ref_len": len(ref_ids), "lane_len": len(lane_ids)}
    if first is not None:
        out["first_divergent_pos"] = first
        out["ref_id"] = ref_ids[first] if first < len(ref_ids) else None
        out["lane_id"] = lane_ids[first] if first < len(lane_ids) else None
        out["ref_piece"] = ref_pieces[first] if first < len(ref_pieces) else None
        out["lane_piece"] = lane_pieces[first] if first < len(lane_pieces) else None
    return out


def lane_eval(backend: Mapping[str, Any], model_path: str, prompt: Mapping[str, Any], reference_npz: str,
              threads: int, out_npz: str) -> dict[str, Any]:
    from parity_both.lanes.base import TokenizationContract, apply_contract

    ref = load_reference(reference_npz)
    full_ids = ref["ids"]
    t0 = time.perf_counter()
    engine = open_lane(backend, model_path, n_ctx=max(len(full_ids), len(prompt["ids"])) + 8, threads=threads)
    try:
        t_load = time.perf_counter() - t0
        contract = TokenizationContract(**prompt["contract"])
        vocab = engine.vocab()
        body = engine.tokenize(prompt["formatted"], contract.parse_special)
        lane_ids = apply_contract(body, contract, vocab.bos_id, vocab.eos_id)
        lane_pieces = [engine.piece(i) for i in lane_ids]
        parity = compare_ids(list(prompt["ids"]), list(prompt["pieces"]), lane_ids, lane_pieces)
        t1 = time.perf_counter()
        logits = engine.eval_logits(full_ids) if parity["match"] else None  # no logits on a mismatch
        t_eval = time.perf_counter() - t1
        identity, settings = engine.identity(), engine.settings()
    finally:
        engine.close()
    timings = {"load_s": t_load, "eval_s": t_eval, "total_s": time.perf_counter() - t0}
    save_npz(out_npz, lane_ids=np.asarray(lane_ids, dtype=np.int64),
             lane_pieces=json.dumps(lane_pieces, ensure_ascii=False), token_parity=json.dumps(parity, sort_keys=True),
             logits=np.asarray(logits, dtype=np.float32) if logits is not None else np.zeros((0, 0), np.float32),
             has_logits=np.bool_(logits is not None), identity=json.dumps(identity, sort_keys=True),
             settings=json.dumps(settings, sort_keys=True), timings=json.dumps(timings, sort_keys=True),
             timestamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    return {"token_parity": parity, "timings": timings}


def load_lane(path: str) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as z:
        return {"lane_ids": [int(i) for i in z["lane_ids"]], "token_parity": json.loads(str(z["token_parity"])),
                "lane_pieces": json.loads(str(z["lane_pieces"])) if "lane_pieces" in z.files else None,
                "logits": z["logits"] if bool(z["has_logits"]) else None,
                "identity": json.loads(str(z["identity"])), "settings": json.loads(str(z["settings"])),
                "timings": json.loads(str(z["timings"])), "timestamp": str(z["timestamp"])}


# -- receipts and summary ---------------------------------------------------------------------
def make_receipt(*, lane: str, model_name: str, model_json: str, authority_json: str, tokenizer_json: str,
                 prompt_json: str,
                 reference_npz: str, lane_npz: str, lane_vocab_json: str, backend_json: str,
                 thresholds: Mapping[str, Any], mode: str, gates: Collection[str], lane_gguf: str | None = None,
                 transcode_json: str | None = None) -> dict[str, Any]:
    from parity_both.receipt import build_receipt, validate_receipt

    lane_vocab_rec = read_json(lane_vocab_json)
    authority = read_json(authority_json)
    lane_auth = {k: v for k, v in lane_vocab_rec.items() if k != "tokens"}
    if lane_auth.get("vocab_hash") != authority.get("vocab_hash"):
        lane_auth["difference"] = vocab_difference(tokenizer_json, authority, lane_vocab_rec)
    receipt = build_receipt(
        lane=lane, model=read_json(model_json), authority=authority, lane_vocab=lane_auth,
        prompt=read_json(prompt_json), reference=load_reference(reference_npz), lane_result=load_lane(lane_npz),
        backend=read_json(backend_json), thresholds=thresholds, mode=mode, gates=list(gates))
    receipt["model_name"] = model_name
    model_file = read_json(model_json)["path"]
    receipt["evaluated_files"] = {
        "reference": model_file,
        "lane": str(Path(lane_gguf).resolve()) if lane_gguf else model_file,
        "transcode": read_json(transcode_json) if transcode_json else None,
    }
    from parity_both.receipt import content_hash

    receipt["content_sha256"] = content_hash(receipt)
    validate_receipt(receipt)
    return receipt


def vocab_difference(tokenizer_json: str, authority: Mapping[str, Any],
                     lane_vocab_rec: Mapping[str, Any]) -> dict[str, Any] | None:
    """First id (or flag) where the lane's vocabulary differs from the reference authority's."""
    from parity_both.lanes.base import VocabDump
    from parity_both.tokenize.authority import compare_vocabs
    from parity_both.tokenize.vocab import ReferenceTokenizer

    ref = ReferenceTokenizer.from_files(tokenizer_json, authority).vocab_dump()
    lane = VocabDump([(int(i), str(t), str(k)) for i, t, k in lane_vocab_rec["tokens"]],
                     lane_vocab_rec.get("bos_id"), lane_vocab_rec.get("eos_id"),
                     bool(lane_vocab_rec.get("add_bos")), bool(lane_vocab_rec.get("add_eos")))
    return compare_vocabs(ref, lane)


def make_summary(receipt_paths: list[str]) -> dict[str, Any]:
    from parity_both.receipt import load_receipt
    from parity_both.summary import build_summary

    receipts = []
    for p in receipt_paths:
        r = load_receipt(p)
        r["_path"] = p
        receipts.append(r)
    return build_summary(receipts)


# -- small utilities --------------------------------------------------------------------------
def read_json(path: str) -> Any:
    return json.loads(Path(path).read_text())


def save_npz(path: str, **arrays: Any) -> None:
    """Atomic, uncompressed npz (no half-written results)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, p)


__all__ = ["InputError", "model_facts", "prompt_record", "reference_logits", "lane_vocab", "lane_eval",
           "make_receipt", "make_summary", "write_json", "read_json", "compare_ids"]
