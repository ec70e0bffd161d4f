"""The run's verdict: every model, lane and prompt, in the seed's JSON and text layouts.

Each lane and prompt has two verdicts (see receipt.py): `graph` (on the lossless twin) and
`quantized` (on the model file); a lane passes only if both pass for every prompt.

Exit codes (the seed's table): 0 every lane passed; 1 a lane failed its thresholds (or a gate);
2 token mismatch, inconsistent tokenizer, bad arguments or unusable input. Jobs that fail write a
failure record beside their log (parity_both.jobs); a failed run's summary lists them (`errors`)
with the lanes that could not run, and takes its exit code from them (3 network, 4 permission,
5 build, 6 recursion, 2 bad input).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from parity_both.receipt import VERDICTS, canonical_json, worst

RULE = "─" * 58
DOUBLE = "═" * 58
AUTHORITY_KEYS = (
    "source",
    "path",
    "file_hash",
    "config_hash",
    "vocab_hash",
    "vocab_size",
    "bos_id",
    "eos_id",
    "add_bos",
    "add_eos",
    "tokenizer_model",
    "tokenizer_pre",
    "fidelity",
)


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _prompt_verdict(section: Mapping[str, Any]) -> dict[str, Any]:
    if section["status"] == "skipped":
        return {"status": "skipped", "reason": section["reason"]}
    s = section["summary"]
    return {
        "status": section["status"],
        "first_divergence": s.get("first_divergence"),
        "mean_mse": s.get("mean_mse"),
        "mean_cosine_sim": s.get("mean_cosine"),
        "mean_kl": s.get("mean_kl"),
        "nmse": s.get("nmse"),
        "same_top1_rate": (s.get("same_top1") or {}).get("rate"),
        "greedy_exact_match_rate": (section.get("greedy") or {}).get("exact_match_rate"),
    }


def _lane_verdict(prompts: Mapping[str, Mapping[str, Any]], which: str) -> dict[str, Any]:
    entries = {name: p[which] for name, p in prompts.items()}
    evaluated = {name: e for name, e in entries.items() if e["status"] != "skipped"}
    if not evaluated:
        return {"status": "skipped", "reason": next(iter(entries.values()))["reason"]}
    first = next(({"prompt": k, **e["first_divergence"]} for k, e in evaluated.items() if e["first_divergence"]), None)
    return {
        "status": worst([e["status"] for e in evaluated.values()]),
        "first_divergence": first,
        **{key: _mean([e[key] for e in evaluated.values()]) for key in ("mean_mse", "mean_cosine_sim", "mean_kl")},
    }


def _lane_entry(receipts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    prompts = {}
    for r in receipts:
        s = r["summary"]
        prompts[r.get("prompt_name") or r["prompt"]] = {
            "status": r["status"],
            **{v: _prompt_verdict(r[v]) for v in VERDICTS},
            "token_parity": (r.get("token_parity") or {}).get("match"),
            "failures": s.get("failures") or ([s["reason"]] if s.get("reason") else []),
            "receipt_path": r.get("_path"),
            "upgraded_from_version": r.get("upgraded_from_version"),
        }
    statuses = [r["status"] for r in receipts]
    ident = receipts[0].get("backend_identity") or {}
    lane_auth = receipts[0].get("lane_tokenizer_authority") or {}
    return {
        "backend": receipts[0]["backend"],
        "engine": ident.get("engine"),
        "version": ident.get("version") or ident.get("revision"),
        "status": "ok" if worst(statuses) == "pass" else worst(statuses),
        "passed": worst(statuses) == "pass",
        **{v: _lane_verdict(prompts, v) for v in VERDICTS},
        "tokenizer_consistent": all(r.get("tokenizer_consistent") is not False for r in receipts),
        "lane_vocab_hash": lane_auth.get("vocab_hash"),
        "tokenizer_difference": next(
            (
                (r.get("lane_tokenizer_authority") or {}).get("difference")
                for r in receipts
                if (r.get("lane_tokenizer_authority") or {}).get("difference")
            ),
            None,
        ),
        "prompts": prompts,
    }


def _model_entry(rs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    by_lane: dict[str, list[Mapping[str, Any]]] = {}
    for r in rs:
        by_lane.setdefault(r["backend"], []).append(r)
    lanes = {lane: _lane_entry(sorted(v, key=lambda r: r.get("prompt_name") or "")) for lane, v in by_lane.items()}
    auth = rs[0].get("tokenizer_authority") or {}
    return {
        "model": rs[0]["model"],
        "model_sha256": rs[0].get("model_sha256"),
        "tokenizer_authority": {k: auth.get(k) for k in AUTHORITY_KEYS},
        "tokenizer_consistent": all(v["tokenizer_consistent"] for v in lanes.values()),
        "lanes": dict(sorted(lanes.items())),
    }


def failed_run_exit_code(errors: Sequence[Mapping[str, Any]], any_receipt: bool) -> int:
    """The exit code of a run that failed: the most specific code of its failure records (any code
    beats 1, "internal"); without records, 1 if some receipt exists, else 2."""
    if not errors:
        return 1 if any_receipt else 2
    return max((int(e.get("exit_code") or 1) for e in errors), key=lambda c: (c != 1, c))


def build_summary(
    receipts: Sequence[Mapping[str, Any]], errors: Sequence[Mapping[str, Any]] | None = None, lanes: Sequence[str] = ()
) -> dict[str, Any]:
    """The summary of `receipts`. errors: None for a run that completed; for a run that failed, the
    failure records of its jobs (each lane named in one is a lane that could not run). lanes: every
    lane the run was asked for (listed even when no receipt exists)."""
    models: dict[str, list[Mapping[str, Any]]] = {}
    for r in receipts:
        models.setdefault(r.get("model_name") or r["model"], []).append(r)
    out_models = {name: _model_entry(rs) for name, rs in sorted(models.items())}
    exit_code = max([0, *(int(r["exit_code"]) for r in receipts)])
    lanes_flat: dict[str, dict[str, Any]] = {}
    for lane in sorted({*lanes, *(lane for m in out_models.values() for lane in m["lanes"])}):
        entries = {n: m["lanes"][lane] for n, m in out_models.items() if lane in m["lanes"]}
        ok = bool(entries) and all(e["passed"] for e in entries.values())
        lanes_flat[lane] = {"status": "ok" if ok else "failed", "models": {n: e["status"] for n, e in entries.items()}}
    if errors is not None:
        exit_code = max(exit_code, failed_run_exit_code(errors, bool(receipts)))
        for e in errors:  # a lane that could not run is a failed lane, with its reason
            lane = (e.get("wildcards") or {}).get("lane")
            if lane:
                lanes_flat.setdefault(lane, {"models": {}}).update(
                    status="error", exit_code=e.get("exit_code"), kind=e.get("kind"), message=e.get("message")
                )
    passed = errors is None and bool(lanes_flat) and all(v["status"] == "ok" for v in lanes_flat.values())
    first_model = next(iter(out_models.values()), None)
    summary = {
        "status": "ok" if passed else "failed",
        "tokenizer_authority": first_model["tokenizer_authority"] if first_model else None,
        "lanes": lanes_flat,
        "models": out_models,
        "overall": {
            "both_passed": passed,
            "all_passed": passed,
            "tokenizer_consistent": all(m["tokenizer_consistent"] for m in out_models.values()) if out_models else None,
            "exit_code": exit_code,
            "lanes": sorted(lanes_flat),
            "receipts": len(receipts),
        },
    }
    if errors is not None:
        summary["errors"] = [dict(e) for e in errors]
        if not receipts:
            summary["error"] = run_error(errors, exit_code)
    return summary


DEFAULT_FIX = {
    "bad_model": "pass a complete, valid GGUF file (re-download or re-convert it)",
    "bad_input": "fix the input the message names, then rerun",
    "bad_arguments": "fix the command line (see parity-both --help)",
    "workflow": "read the log; fix what it names, then rerun",
    "output": "pass an --out-dir that is a writable directory (or can be created as one)",
    "busy": "wait for the other run to finish, or use another --out-dir",
    "internal": "read the log: this is a bug in parity-both if the inputs are valid",
}


def run_error(errors: Sequence[Mapping[str, Any]], exit_code: int) -> dict[str, Any]:
    """The `error` object of a run that failed before any receipt: the failure record that decided
    its exit code (kind, message, log relative to the workflow's directory, fix)."""
    rec = next((e for e in errors if int(e.get("exit_code") or 1) == exit_code), errors[0] if errors else {})
    kind = rec.get("kind") or "workflow"
    return {
        "kind": kind,
        "message": rec.get("message") or "the workflow failed before any job ran",
        "log": rec.get("log"),
        "fix": rec.get("hint") or DEFAULT_FIX.get(kind, DEFAULT_FIX["workflow"]),
        "rule": rec.get("rule"),
    }


def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def _mark(status: str) -> str:
    return {"pass": "✓", "skipped": "-"}.get(status, "✗")


def _authority_lines(name: str, m: Mapping[str, Any]) -> list[str]:
    a = m["tokenizer_authority"]
    return [
        f"Model: {name}",
        f"  File:             {m['model']}",
        f"  SHA-256:          {m['model_sha256']}",
        "",
        "Tokenizer Authority",
        RULE,
        f"Source:           {a['source']}",
        f"Path:             {a['path']}",
        f"File hash:        {a['file_hash']}",
        f"Config hash:      {a['config_hash']}",
        f"Vocab hash:       {a['vocab_hash']}",
        f"Vocab size:       {a['vocab_size']} (bos {a['bos_id']}, eos {a['eos_id']}, "
        f"add_bos {a['add_bos']}, pre {a['tokenizer_pre']})",
        f"Consistent:       {'✓ yes' if m['tokenizer_consistent'] else '✗ NO'} (reference vs every lane)",
        "",
    ]


def _verdict_line(label: str, v: Mapping[str, Any]) -> str:
    if v["status"] == "skipped":
        return f"{label:<18}- skipped ({v['reason']})"
    fd = v["first_divergence"]
    where = (
        f"; first divergence: prompt {fd['prompt']}, position {fd['pos']} ({'; '.join(fd.get('reasons', []))})"
        if fd
        else ""
    )
    return (
        f"{label:<18}{_mark(v['status'])} {v['status']:<6} mean KL {_fmt(v['mean_kl'])}  mean MSE "
        f"{_fmt(v['mean_mse'])}  mean cosine {_fmt(v['mean_cosine_sim'], '.6f')}{where}"
    )


def _prompt_lines(pname: str, p: Mapping[str, Any]) -> list[str]:
    lines = [f"  {_mark(p['status'])} {pname:<20} {p['status']}"]
    for which in VERDICTS:
        v = p[which]
        if v["status"] == "skipped":
            lines.append(f"      {which:<10} skipped")
            continue
        lines.append(
            f"      {which:<10} {v['status']:<14} KL {_fmt(v['mean_kl'])}  NMSE {_fmt(v['nmse'])}  same-top "
            f"{_fmt(v['same_top1_rate'], '.3f')}  greedy {_fmt(v['greedy_exact_match_rate'], '.3f')}"
        )
    lines += [f"      {f}" for f in p["failures"][:3]]
    lines.append(f"      receipt: {p['receipt_path']}")
    return lines


def _lane_lines(label: str, lane: str, v: Mapping[str, Any]) -> list[str]:
    lines = [
        f"Lane {label}: {lane}",
        RULE,
        f"Backend:          {v['engine']} {v['version'] or ''}".rstrip(),
        f"Status:           {'✓ Parity OK' if v['passed'] else '✗ ' + v['status'].upper()}",
        _verdict_line("Graph (twin):", v["graph"]),
        _verdict_line("Quantized:", v["quantized"]),
    ]
    if v.get("tokenizer_difference"):
        lines.append(f"Vocab difference: {canonical_json(v['tokenizer_difference'])}")
    for pname, p in v["prompts"].items():
        lines += _prompt_lines(pname, p)
    return [*lines, ""]


def render_text(summary: Mapping[str, Any]) -> str:
    lines = ["Parity-Both Cross-Validation Summary", DOUBLE, ""]
    for name, m in summary["models"].items():
        lines += _authority_lines(name, m)
        for i, (lane, v) in enumerate(m["lanes"].items()):
            lines += _lane_lines(chr(ord("A") + i) if i < 26 else str(i), lane, v)
    if not summary["models"]:
        lines += ["No lane produced a receipt.", ""]
    errored = {k: v for k, v in summary["lanes"].items() if v.get("status") == "error"}
    if errored:
        lines += ["Lanes that could not run", RULE]
        lines += [
            f"{lane}: {v.get('kind')} (exit {v.get('exit_code')}): {v.get('message')}" for lane, v in errored.items()
        ]
        lines.append("")
    o = summary["overall"]
    tokenizers = {True: "✓ consistent", False: "✗ INCONSISTENT", None: "n/a"}[o["tokenizer_consistent"]]
    n_failed = sum(1 for v in summary["lanes"].values() if v["status"] != "ok")
    lines += [
        "Overall Status",
        RULE,
        "Both lanes:       "
        + ("✓ PASSED" if o["both_passed"] else f"✗ FAILED ({n_failed} of {len(summary['lanes'])} lanes failed)"),
        f"Tokenizers:       {tokenizers}",
        f"Exit code:        {o['exit_code']}",
        "",
    ]
    return "\n".join(lines)
