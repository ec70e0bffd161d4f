"""The run's verdict: every model, lane and prompt, in the seed's JSON and text layouts.

Exit codes (the seed's table): 0 every lane passed; 1 a lane failed its thresholds (or a gate);
2 token mismatch, inconsistent tokenizer, bad arguments or unusable input. Backend provisioning
failures (3 network, 4 permission, 5 build, 6 recursion) are raised before any receipt exists and
are mapped by the `parity-both` command.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from parity_both.receipt import canonical_json

RULE = "─" * 58
DOUBLE = "═" * 58


def _lane_entry(receipts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    statuses = [r["status"] for r in receipts]
    passed = all(s == "pass" for s in statuses)
    prompts = {}
    for r in receipts:
        s = r["summary"]
        prompts[r.get("prompt_name") or r["prompt"]] = {
            "status": r["status"],
            "first_divergence": s.get("first_divergence"),
            "mean_mse": s.get("mean_mse"),
            "mean_cosine_sim": s.get("mean_cosine"),
            "mean_kl": s.get("mean_kl"),
            "nmse": s.get("nmse"),
            "same_top1_rate": (s.get("same_top1") or {}).get("rate"),
            "greedy_exact_match_rate": (r.get("greedy") or {}).get("exact_match_rate"),
            "token_parity": r["token_parity"]["match"],
            "failures": s.get("failures") or ([s["reason"]] if s.get("reason") else []),
            "receipt_path": r.get("_path"),
        }
    first = next(({"prompt": k, **v["first_divergence"]} for k, v in prompts.items() if v["first_divergence"]),
                 None)

    def mean(key: str) -> float | None:
        vals = [v[key] for v in prompts.values() if v[key] is not None]
        return sum(vals) / len(vals) if vals else None

    ident = receipts[0].get("backend_identity") or {}
    return {
        "backend": receipts[0]["backend"],
        "engine": ident.get("engine"),
        "version": ident.get("version") or ident.get("revision"),
        "status": "ok" if passed else _worst(statuses),
        "passed": passed,
        "first_divergence": first,
        "mean_mse": mean("mean_mse"),
        "mean_cosine_sim": mean("mean_cosine_sim"),
        "mean_kl": mean("mean_kl"),
        "tokenizer_consistent": all(r["tokenizer_consistent"] for r in receipts),
        "lane_vocab_hash": receipts[0]["lane_tokenizer_authority"].get("vocab_hash"),
        "tokenizer_difference": next((r["lane_tokenizer_authority"].get("difference") for r in receipts
                                      if r["lane_tokenizer_authority"].get("difference")), None),
        "prompts": prompts,
    }


_SEVERITY = ["pass", "fail", "error", "tokenizer_inconsistent", "token_mismatch"]


def _worst(statuses: Sequence[str]) -> str:
    return max(statuses, key=_SEVERITY.index)


def build_summary(receipts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    models: dict[str, dict[str, Any]] = {}
    for r in receipts:
        m = models.setdefault(r["model_name"], {"receipts": []})
        m["receipts"].append(r)
    out_models = {}
    worst_exit = 0
    all_consistent = True
    for name, m in sorted(models.items()):
        rs = m["receipts"]
        by_lane: dict[str, list[Mapping[str, Any]]] = {}
        for r in rs:
            by_lane.setdefault(r["backend"], []).append(r)
        lanes = {lane: _lane_entry(sorted(v, key=lambda r: r.get("prompt_name") or "")) for lane, v in by_lane.items()}
        auth = rs[0]["tokenizer_authority"]
        consistent = all(v["tokenizer_consistent"] for v in lanes.values())
        all_consistent &= consistent
        worst_exit = max([worst_exit, *(r["exit_code"] for r in rs)])
        out_models[name] = {
            "model": rs[0]["model"],
            "model_sha256": rs[0]["model_sha256"],
            "tokenizer_authority": {k: auth.get(k) for k in (
                "source", "path", "file_hash", "config_hash", "vocab_hash", "vocab_size", "bos_id", "eos_id",
                "add_bos", "add_eos", "tokenizer_model", "tokenizer_pre", "fidelity")},
            "tokenizer_consistent": consistent,
            "lanes": dict(sorted(lanes.items())),
        }
    lane_names = sorted({lane for m in out_models.values() for lane in m["lanes"]})
    lanes_flat = {
        lane: {
            "status": "ok" if all(m["lanes"][lane]["passed"] for m in out_models.values() if lane in m["lanes"])
            else "failed",
            "models": {n: m["lanes"][lane]["status"] for n, m in out_models.items() if lane in m["lanes"]},
        }
        for lane in lane_names
    }
    both = all(v["status"] == "ok" for v in lanes_flat.values())
    first_model = next(iter(out_models.values()), None)
    return {
        "status": "ok" if both else "failed",
        "tokenizer_authority": first_model["tokenizer_authority"] if first_model else None,
        "lanes": lanes_flat,
        "models": out_models,
        "overall": {
            "both_passed": both,
            "all_passed": both,
            "tokenizer_consistent": all_consistent,
            "exit_code": worst_exit,
            "lanes": lane_names,
            "receipts": len(receipts),
        },
    }


def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def render_text(summary: Mapping[str, Any]) -> str:
    lines = ["Parity-Both Cross-Validation Summary", DOUBLE, ""]
    for name, m in summary["models"].items():
        a = m["tokenizer_authority"]
        lines += [f"Model: {name}", f"  File:             {m['model']}", f"  SHA-256:          {m['model_sha256']}", "",
                  "Tokenizer Authority", RULE,
                  f"Source:           {a['source']}",
                  f"Path:             {a['path']}",
                  f"File hash:        {a['file_hash']}",
                  f"Config hash:      {a['config_hash']}",
                  f"Vocab hash:       {a['vocab_hash']}",
                  f"Vocab size:       {a['vocab_size']} (bos {a['bos_id']}, eos {a['eos_id']}, "
                  f"add_bos {a['add_bos']}, pre {a['tokenizer_pre']})",
                  f"Consistent:       {'✓ yes' if m['tokenizer_consistent'] else '✗ NO'} (reference vs every lane)",
                  ""]
        for i, (lane, v) in enumerate(m["lanes"].items()):
            label = chr(ord("A") + i) if i < 26 else str(i)
            lines += [f"Lane {label}: {lane}", RULE,
                      f"Backend:          {v['engine']} {v['version'] or ''}".rstrip(),
                      f"Status:           {'✓ Parity OK' if v['passed'] else '✗ ' + v['status'].upper()}"]
            fd = v["first_divergence"]
            lines.append("First divergence: " + (
                f"prompt {fd['prompt']}, position {fd['pos']} ({'; '.join(fd.get('reasons', []))})" if fd else "None"))
            lines += [f"Mean MSE:         {_fmt(v['mean_mse'])}",
                      f"Mean cosine sim:  {_fmt(v['mean_cosine_sim'], '.6f')}",
                      f"Mean KL:          {_fmt(v['mean_kl'])}"]
            if v.get("tokenizer_difference"):
                lines.append(f"Vocab difference: {canonical_json(v['tokenizer_difference'])}")
            for pname, p in v["prompts"].items():
                mark = "✓" if p["status"] == "pass" else "✗"
                same = p["same_top1_rate"]
                lines.append(f"  {mark} {pname:<20} {p['status']:<14} KL {_fmt(p['mean_kl'])}  NMSE {_fmt(p['nmse'])}"
                             f"  same-top {_fmt(same, '.3f')}  greedy {_fmt(p['greedy_exact_match_rate'], '.3f')}")
                for f in p["failures"][:3]:
                    lines.append(f"      {f}")
                lines.append(f"      receipt: {p['receipt_path']}")
            lines.append("")
    errored = {k: v for k, v in summary["lanes"].items() if v.get("status") == "error"}
    if errored:
        lines += ["Lanes that could not run", RULE]
        for lane, v in errored.items():
            lines.append(f"{lane}: {v.get('kind')} (exit {v.get('exit_code')}): {v.get('message')}")
        lines.append("")
    o = summary["overall"]
    n_failed = sum(1 for v in summary["lanes"].values() if v["status"] != "ok")
    lines += ["Overall Status", RULE,
              "Both lanes:       " + ("✓ PASSED" if o["both_passed"]
                                         else f"✗ FAILED ({n_failed} of {len(summary['lanes'])} lanes failed)"),
              f"Tokenizers:       {'✓ consistent' if o['tokenizer_consistent'] else '✗ INCONSISTENT'}",
              f"Exit code:        {o['exit_code']}", ""]
    return "\n".join(lines)
