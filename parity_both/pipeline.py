"""One function per workflow step. Scripts under scripts/ only read the `snakemake` object and call
these, so every step can be tested (and reused by the CLI) without Snakemake."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from parity_both.config import twin_graph_thresholds
from parity_both.corpus import windows_of
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
    check_finite(g)
    return facts


# block types whose every block begins with its f16 scale (ggml-common.h): scales checked in place
SCALE_FIRST_BLOCKS = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}
FLOAT_VIEWS = {"F32": "<f4", "F16": "<f2"}


def check_finite(g: Any) -> None:
    """InputError naming the first tensor with a NaN or infinite value (float tensors, and the f16
    scales of the simple block types): a model that computes NaN cannot be compared."""
    for t in g.tensors.values():
        raw = g.raw(t.name)
        if t.type_name in FLOAT_VIEWS:
            values = raw.view(FLOAT_VIEWS[t.type_name])
        elif t.type_name == "BF16":
            values = (raw.view("<u2").astype(np.uint32) << 16).view("<f4")
        elif t.type_name in SCALE_FIRST_BLOCKS:
            values = raw.reshape(-1, SCALE_FIRST_BLOCKS[t.type_name])[:, :2].copy().view("<f2")
        else:
            continue
        bad = not bool(np.isfinite(values).all())
        del values, raw
        g.release(t.name)
        if bad:
            raise InputError(
                f"{g.path.name}: tensor {t.name!r} ({t.type_name}) has values that are not finite (NaN/inf); "
                "the model file is corrupt: re-download or re-convert it"
            )


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
    fix = (
        "fix the file or remove models.<name>.tokenizer from config to use the GGUF's own vocabulary"
        if path
        else "use a GGUF converted by a current llama.cpp, or name a tokenizer.json in config"
    )
    return f"{what} ({source}) cannot be used: {str(e).splitlines()[0] if str(e) else type(e).__name__}; {fix}"


# -- prompt -----------------------------------------------------------------------------------
def fit_context(
    ids: list[int], name: str, n_ctx: int, context: Mapping[str, Any] | None
) -> tuple[list[int], dict[str, Any]]:
    """(ids, what was done): a prompt whose ids plus max_tokens exceed the model's context length
    (n_ctx, 0 when unknown) is refused with InputError, or cut to fit when context['truncate']."""
    max_tokens = int((context or {}).get("max_tokens") or 0)
    facts = {"n_ctx_train": n_ctx or None, "max_tokens": max_tokens, "n_prompt_tokens": len(ids), "truncated_to": None}
    if not n_ctx or len(ids) + max_tokens <= n_ctx:
        return ids, facts
    room = n_ctx - max_tokens
    if not (context or {}).get("truncate") or room < 1:
        raise InputError(
            f"prompt {name!r} is {len(ids)} tokens; with max_tokens {max_tokens} that exceeds the model's "
            f"context length {n_ctx}: shorten the prompt, lower --max-tokens, or pass --truncate-prompt"
        )
    return ids[:room], {**facts, "truncated_to": room}


def prompt_record(
    gguf_path: str,
    authority: Mapping[str, Any],
    tokenizer_json: str,
    name: str,
    settings: Mapping[str, Any],
    context: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    from parity_both.lanes.base import apply_contract
    from parity_both.tokenize import templates
    from parity_both.tokenize.reference import ReferenceTokenizer
    from parity_both.tokenize.reference import stop_ids as eog_stop_ids

    if settings.get("corpus"):
        from parity_both.corpus import corpus_record

        return corpus_record(gguf_path, authority, tokenizer_json, name, settings)
    md = read_gguf(gguf_path).metadata
    requested = settings.get("template") or "auto"
    if requested == "auto":
        used, evidence = templates.detect(md, gguf_path)
    else:
        used, evidence = requested, {"rule": "configured"}
    tok = ReferenceTokenizer.from_files(tokenizer_json, authority)
    bos_text = tok.piece(tok.bos_id) if tok.bos_id is not None else None
    fp = templates.format_prompt(
        used,
        settings["text"],
        settings.get("system_prompt"),
        md,
        vocab_add_bos=tok.add_bos,
        vocab_add_eos=tok.add_eos,
        bos_text=bos_text,
    )
    body = tok.encode(fp.text, parse_special=fp.contract.parse_special)
    ids = apply_contract(body, fp.contract, tok.bos_id, tok.eos_id)
    if len(ids) >= 2 and tok.bos_id is not None and ids[0] == ids[1] == tok.bos_id:
        raise InputError(
            f"prompt {name!r}: the token ids begin with two BOS tokens ({tok.bos_id}); the template "
            f"text already contains BOS - use a template without it or set the prompt's template"
        )
    if not ids:
        raise InputError(f"prompt {name!r} tokenizes to no tokens; give it some text")
    ids, context_facts = fit_context(
        ids, name, int(md.get(f"{md.get('general.architecture')}.context_length") or 0), context
    )
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
        "context": context_facts,
    }


# -- reference --------------------------------------------------------------------------------
def twin(gguf_path: str, out_gguf: str, dtype: str, out_record: str) -> dict[str, Any]:
    """Write the model's lossless twin and its record (progress in the job's log)."""
    from parity_both.gguf.twin import write_twin

    def progress(done: int, total: int, name: str) -> None:
        if done == total or done % 20 == 0:
            log.info("twin: %d/%d tensors written (%s)", done, total, name)

    record = write_twin(gguf_path, out_gguf, dtype, progress=progress)
    write_json(out_record, record)
    return record


def effective_activation(activation: str | None, twin_record: Mapping[str, Any] | None) -> str | None:
    """The FFN activation for a reference run: the configured one, else - on a twin whose key prefix was
    renamed (bitnet-b1.58 -> bitnet) - the ORIGINAL architecture's default, so both verdicts compute the
    same model."""
    if activation or not twin_record:
        return activation
    from parity_both.reference.hparams import DEFAULT_ACTIVATION

    return DEFAULT_ACTIVATION.get(str(twin_record["source"]["architecture"]))


def reference_logits(
    gguf_path: str,
    prompt: Mapping[str, Any],
    max_tokens: int,
    mode: str,
    activation: str | None,
    out_npz: str,
    prepared_dir: str | None = None,
    twin_record: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    from parity_both.reference import run_reference

    activation = effective_activation(activation, twin_record)
    if prompt.get("window_starts"):  # a corpus: every window from an empty cache, nothing generated
        max_tokens = 0
        runs = [
            run_reference(gguf_path, w, 0, mode=mode, activation=activation, prepared_dir=prepared_dir)
            for w in windows_of(prompt, list(prompt["ids"]))
        ]
    else:
        runs = [
            run_reference(
                gguf_path,
                list(prompt["ids"]),
                int(max_tokens),
                mode=mode,
                activation=activation,
                stop_ids=prompt.get("stop_ids") or (),
                prepared_dir=prepared_dir,
            )
        ]
    res = runs[-1]
    logits = np.concatenate([np.asarray(r.logits, dtype=np.float32) for r in runs])
    ids = [i for r in runs for i in r.ids]
    n_prompt = sum(r.n_prompt for r in runs)
    timings = {k: sum(float(r.timings.get(k, 0.0)) for r in runs) for k in res.timings}
    settings = dict(res.settings)
    settings.update(max_tokens=int(max_tokens), stop_ids=list(prompt.get("stop_ids") or []))
    if prompt.get("window_starts"):
        settings.update(window_starts=list(prompt["window_starts"]))
    save_npz(
        out_npz,
        logits=logits,
        ids=np.asarray(ids, dtype=np.int64),
        n_prompt=np.int64(n_prompt),
        settings=json.dumps(settings, sort_keys=True),
        timings=json.dumps(timings, sort_keys=True),
    )
    return {"n_tokens": len(ids), "timings": timings}


def load_reference(path: str) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as z:
        return {
            "logits": z["logits"],
            "ids": [int(i) for i in z["ids"]],
            "n_prompt": int(z["n_prompt"]),
            "settings": json.loads(str(z["settings"])),
            "timings": json.loads(str(z["timings"])),
        }


# -- lanes ------------------------------------------------------------------------------------
def open_lane(backend: Mapping[str, Any], model_path: str, n_ctx: int, threads: int, vocab_only: bool = False):
    kind = backend.get("kind")
    if kind == "python":
        from parity_both.lanes.llama_cpp_python import LlamaCppPythonLane

        return LlamaCppPythonLane(model_path, n_ctx=n_ctx, threads=threads, vocab_only=vocab_only)
    if kind == "harness":
        from parity_both.lanes.harness import HarnessLane

        return HarnessLane.from_backend(backend, model_path, n_ctx=n_ctx, threads=threads)
    if kind == "command":  # any program speaking the lane protocol (docs/lane-protocol.md)
        from parity_both.lanes.command import CommandLane

        return CommandLane.from_backend(backend, model_path, n_ctx=n_ctx, threads=threads)
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
        "bos_id": dump.bos_id,
        "eos_id": dump.eos_id,
        "add_bos": dump.add_bos,
        "add_eos": dump.add_eos,
        "source": f"{backend.get('engine')} API ({backend.get('lane')})",
        "tokens": [[i, t, k] for i, t, k in dump.tokens],
    }


def lane_eval(
    backend: Mapping[str, Any],
    model_path: str,
    prompt: Mapping[str, Any],
    reference_npz: str,
    threads: int,
    out_npz: str,
) -> dict[str, Any]:
    from parity_both.lanes.tokens import compare_ids, lane_tokenization

    ref = load_reference(reference_npz)
    full_ids = ref["ids"]
    t0 = time.perf_counter()
    engine = open_lane(backend, model_path, n_ctx=max(len(full_ids), len(prompt["ids"])) + 8, threads=threads)
    try:
        t_load = time.perf_counter() - t0
        lane_ids = lane_tokenization(engine, prompt)
        lane_pieces = [engine.piece(i) for i in lane_ids]
        parity = compare_ids(list(prompt["ids"]), list(prompt["pieces"]), lane_ids, lane_pieces)
        t1 = time.perf_counter()
        logits = None  # no logits on a mismatch
        if parity["match"]:
            logits = np.concatenate([engine.eval_logits(w) for w in windows_of(prompt, full_ids)])
        t_eval = time.perf_counter() - t1
        identity, settings = engine.identity(), engine.settings()
    finally:
        engine.close()
    timings = {"load_s": t_load, "eval_s": t_eval, "total_s": time.perf_counter() - t0}
    save_npz(
        out_npz,
        lane_ids=np.asarray(lane_ids, dtype=np.int64),
        lane_pieces=json.dumps(lane_pieces, ensure_ascii=False),
        token_parity=json.dumps(parity, sort_keys=True),
        logits=np.asarray(logits, dtype=np.float32) if logits is not None else np.zeros((0, 0), np.float32),
        has_logits=np.bool_(logits is not None),
        identity=json.dumps(identity, sort_keys=True),
        settings=json.dumps(settings, sort_keys=True),
        timings=json.dumps(timings, sort_keys=True),
        timestamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    return {"token_parity": parity, "timings": timings}


def load_lane(path: str) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as z:
        return {
            "lane_ids": [int(i) for i in z["lane_ids"]],
            "token_parity": json.loads(str(z["token_parity"])),
            "lane_pieces": json.loads(str(z["lane_pieces"])) if "lane_pieces" in z.files else None,
            "logits": z["logits"] if bool(z["has_logits"]) else None,
            "identity": json.loads(str(z["identity"])),
            "settings": json.loads(str(z["settings"])),
            "timings": json.loads(str(z["timings"])),
            "timestamp": str(z["timestamp"]),
        }


# -- receipts and summary ---------------------------------------------------------------------
def make_receipt(
    *,
    lane: str,
    model_name: str,
    model_json: str,
    authority_json: str,
    tokenizer_json: str,
    prompt_json: str,
    reference_npz: str,
    lane_npz: str,
    lane_vocab_json: str,
    backend_json: str,
    thresholds: Mapping[str, Mapping[str, Any]],
    mode: str,
    gates: Collection[str],
    lane_gguf: str | None = None,
    transcode_json: str | None = None,
    twin_reference_npz: str | None = None,
    twin_lane_npz: str | None = None,
    twin_record_json: str | None = None,
    localization_json: str | None = None,
    kernels_json: str | None = None,
) -> dict[str, Any]:
    """The receipt of one lane and prompt, validated. thresholds: {"quantized": ..., "graph": ...}.
    The graph verdict is evaluated when the twin's reference and lane npz are given, else skipped."""
    from parity_both.receipt import Evaluation, build_receipt, validate_receipt

    model = read_json(model_json)
    lane_vocab_rec = read_json(lane_vocab_json)
    authority = read_json(authority_json)
    lane_auth = {k: v for k, v in lane_vocab_rec.items() if k != "tokens"}
    if lane_auth.get("vocab_hash") != authority.get("vocab_hash"):
        lane_auth["difference"] = vocab_difference(tokenizer_json, authority, lane_vocab_rec)
    quantized = Evaluation(
        load_reference(reference_npz),
        load_lane(lane_npz),
        {
            "reference": model["path"],
            "lane": str(Path(lane_gguf).resolve()) if lane_gguf else model["path"],
            "transcode": read_json(transcode_json) if transcode_json else None,
        },
    )
    graph = None
    if twin_reference_npz or twin_lane_npz:
        if not (twin_reference_npz and twin_lane_npz):
            raise ValueError("the graph verdict needs both the twin's reference npz and its lane npz")
        rec = read_json(twin_record_json) if twin_record_json else {}
        twin = str(Path(rec["twin"]["path"]).resolve()) if rec else None
        graph = Evaluation(
            load_reference(twin_reference_npz),
            load_lane(twin_lane_npz),
            {
                "reference": twin,
                "lane": twin,
                "twin": {k: rec[k] for k in ("dtype", "exact", "twin", "source") if k in rec} if rec else None,
            },
        )
    receipt = build_receipt(
        lane=lane,
        model_name=model_name,
        model=model,
        authority=authority,
        lane_vocab=lane_auth,
        prompt=read_json(prompt_json),
        backend=read_json(backend_json),
        mode=mode,
        gates=list(gates),
        quantized=quantized,
        thresholds=thresholds["quantized"],
        graph=graph,
        graph_thresholds=twin_graph_thresholds(thresholds, graph.files.get("twin") if graph else None),
        localization=read_json(localization_json) if localization_json else None,
        kernels=read_json(kernels_json) if kernels_json else None,
    )
    validate_receipt(receipt)
    return receipt


def vocab_difference(
    tokenizer_json: str, authority: Mapping[str, Any], lane_vocab_rec: Mapping[str, Any]
) -> dict[str, Any] | None:
    """First id (or flag) where the lane's vocabulary differs from the reference authority's."""
    from parity_both.lanes.base import VocabDump
    from parity_both.tokenize.authority import compare_vocabs
    from parity_both.tokenize.reference import ReferenceTokenizer

    ref = ReferenceTokenizer.from_files(tokenizer_json, authority).vocab_dump()
    lane = VocabDump(
        [(int(i), str(t), str(k)) for i, t, k in lane_vocab_rec["tokens"]],
        lane_vocab_rec.get("bos_id"),
        lane_vocab_rec.get("eos_id"),
        bool(lane_vocab_rec.get("add_bos")),
        bool(lane_vocab_rec.get("add_eos")),
    )
    return compare_vocabs(ref, lane)


def make_summary(
    receipt_paths: Sequence[str], errors: Sequence[Mapping[str, Any]] | None = None, lanes: Sequence[str] = ()
) -> dict[str, Any]:
    """The summary of these receipts (see summary.build_summary for `errors` and `lanes`)."""
    from parity_both.receipt import load_receipt
    from parity_both.summary import build_summary

    receipts = []
    for p in receipt_paths:
        r = load_receipt(p)
        r["_path"] = str(p)
        receipts.append(r)
    summary = build_summary(receipts, errors, lanes)
    summary["run"] = {"id": os.environ.get("PARITY_BOTH_RUN_ID")}  # beside the receipts, not in them
    return summary


def write_summary(summary: Mapping[str, Any], json_path: str | Path, text_path: str | Path) -> None:
    from parity_both.summary import render_text

    write_json(json_path, summary)
    write_text(text_path, render_text(summary))


def failure_records(logs_dir: str | Path, since: float) -> list[dict[str, Any]]:
    """The failure records (parity_both.jobs) written beside the logs under `logs_dir` at or after
    `since` (a job removes its record when it starts, so older ones belong to earlier runs)."""
    records = []
    for p in sorted(Path(logs_dir).rglob("*.failure.json")):
        try:
            if p.stat().st_mtime < since:
                continue
            records.append(json.loads(p.read_text()))
        except (OSError, ValueError):  # vanished or half-written: not a record of this run
            continue
    return records


def write_failed_summary(out_dir: str, receipt_paths: Sequence[str], lanes: Sequence[str], since: float) -> Path:
    """After a failed run (the workflow's onerror handler): summary.failed.json/.txt from the receipts
    that exist and are not downstream of a job that failed in this run, plus the failure records;
    summary.json/.txt are removed, so no earlier run's verdict stands for this one."""
    errors = failure_records(Path(out_dir) / "logs", since)

    def downstream_of_failure(path: str) -> bool:
        model, _, lane, prompt = Path(path).with_suffix("").parts[-4:]
        wildcards = {"model": model, "lane": lane, "prompt": prompt}
        # a job whose wildcards are a subset of the receipt's is upstream of it (backend {lane},
        # reference {model, prompt}, ...): the receipt on disk is an earlier run's
        # (keys a receipt does not have, e.g. the twin's dtype, do not separate them)
        return any(
            e.get("wildcards") and all(wildcards.get(k, v) == v for k, v in e["wildcards"].items()) for e in errors
        )

    usable = [p for p in receipt_paths if Path(p).is_file() and not downstream_of_failure(p)]
    summary = make_summary(usable, errors, lanes)
    for name in ("summary.json", "summary.txt"):
        Path(out_dir, name).unlink(missing_ok=True)
    out = Path(out_dir) / "summary.failed.json"
    write_summary(summary, out, out.with_suffix(".txt"))
    return out


def clear_failed_summary(out_dir: str) -> None:
    """After a run that succeeded (onsuccess): an earlier failed run's summary no longer applies."""
    for name in ("summary.failed.json", "summary.failed.txt"):
        Path(out_dir, name).unlink(missing_ok=True)


# -- small utilities --------------------------------------------------------------------------
def read_json(path: str) -> Any:
    return json.loads(Path(path).read_text())


def write_text(path: str | Path, text: str) -> None:
    """Atomic text file (no half-written results)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, p)


def save_npz(path: str, **arrays: Any) -> None:
    """Atomic, uncompressed npz (no half-written results)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, p)


__all__ = [
    "InputError",
    "model_facts",
    "prompt_record",
    "reference_logits",
    "lane_vocab",
    "lane_eval",
    "make_receipt",
    "make_summary",
    "write_summary",
    "write_failed_summary",
    "failure_records",
    "write_json",
    "write_text",
    "read_json",
]
