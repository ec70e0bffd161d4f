"""Parity receipts (schema v2): what was compared, how, and the verdict.

A receipt holds every field of the seed's v1 ParityReceipt (version, timestamp, model, backend,
prompt, positions, thresholds, rows, summary) plus what makes it trustworthy: the tokenizer
authority on both sides, the prompt template and contract, determinism settings, the model's
SHA-256, the backend identity, the reference settings, more metrics and their definitions.
`content_sha256` covers everything except the timestamp and timings, so a rerun that computes the
same numbers yields the same content hash.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parity_both import metrics
from parity_both.gguf.constants import BITNET_ARCHS

SCHEMA_VERSION = 2
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "receipt.schema.json"
VOLATILE_KEYS = ("timestamp", "timings", "content_sha256")

# Lane status -> exit code contribution (the seed's table).
STATUS_EXIT = {"pass": 0, "fail": 1, "token_mismatch": 2, "tokenizer_inconsistent": 2, "error": 2}


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def content_hash(receipt: Mapping[str, Any]) -> str:
    stable = {k: v for k, v in receipt.items() if k not in VOLATILE_KEYS}
    return hashlib.sha256(canonical_json(stable).encode("utf-8")).hexdigest()


def _finite(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if np.isfinite(x) else None


def position_failures(row: metrics.PositionMetrics, th: Mapping[str, Any]) -> list[str]:
    """Per-position criteria that fail; a threshold set to None is not gated (--metrics)."""
    fails = []
    if th.get("cos_tol") is not None and not (row.cosine >= th["cos_tol"]):
        fails.append(f"cosine {row.cosine:.6f} < cos_tol {th['cos_tol']}")
    if th.get("nmse_max") is not None and not (row.nmse <= th["nmse_max"]):
        fails.append(f"nmse {row.nmse:.3g} > nmse_max {th['nmse_max']}")
    if th.get("kl_max") is not None and not (row.kl <= th["kl_max"]):
        fails.append(f"kl {row.kl:.3g} > kl_max {th['kl_max']}")
    if th.get("topk_min") is not None and not (row.topk_agree >= th["topk_min"]):
        fails.append(f"topk_agree {row.topk_agree:.2f} < topk_min {th['topk_min']}")
    return fails


def evaluate_gates(receipt: Mapping[str, Any], gates: Sequence[str]) -> list[dict[str, Any]]:
    """jq expressions that must be true on the receipt; each result names its expression."""
    if not gates:
        return []
    import jq

    doc = json.loads(canonical_json(receipt))
    results = []
    for expr in gates:
        try:
            values = jq.compile(expr).input_value(doc).all()
            ok = bool(values) and all(v is True for v in values)
            results.append({"expression": expr, "passed": ok, "values": values[:5]})
        except ValueError as e:  # jq compile or runtime error: the gate fails, with the reason
            results.append({"expression": expr, "passed": False, "error": str(e).splitlines()[0]})
    return results


def build_receipt(
    *,
    lane: str,
    model: Mapping[str, Any],
    authority: Mapping[str, Any],
    lane_vocab: Mapping[str, Any],
    prompt: Mapping[str, Any],
    reference: Mapping[str, Any],
    lane_result: Mapping[str, Any],
    backend: Mapping[str, Any],
    thresholds: Mapping[str, Any],
    mode: str,
    gates: Sequence[str] = (),
) -> dict[str, Any]:
    """reference: {'ids', 'logits', 'n_prompt', 'settings', 'timings'};
    lane_result: {'lane_ids', 'token_parity', 'logits' or None, 'settings', 'identity', 'timings', 'timestamp'}."""
    ids = [int(i) for i in reference["ids"]]
    n_prompt = int(reference["n_prompt"])
    tok_consistent = lane_vocab.get("vocab_hash") == authority.get("vocab_hash")
    receipt: dict[str, Any] = {
        "version": SCHEMA_VERSION,
        "timestamp": lane_result.get("timestamp"),
        "model": model["path"],
        "model_sha256": model["sha256"],
        "model_facts": {k: model.get(k) for k in ("architecture", "file_name", "size_bytes", "quant_types",
                                                   "type_numbering")},
        "backend": lane,
        # what the backend rule provisioned, plus what the engine said about itself while running
        "backend_identity": {**dict(backend.get("identity") or {}), "runtime": dict(lane_result.get("identity") or {})},
        "prompt": prompt["prompt"]["text"],
        "prompt_name": prompt["prompt"]["name"],
        "prompt_template": {
            "requested": prompt["template"]["requested"], "used": prompt["template"]["used"],
            "evidence": prompt["template"]["evidence"], "notes": prompt["template"]["notes"],
            "system_prompt": prompt["prompt"].get("system_prompt"), "formatted": prompt["formatted"],
        },
        "tokenization_contract": prompt["contract"],
        "tokenizer_authority": dict(authority),
        "lane_tokenizer_authority": dict(lane_vocab),
        "tokenizer_consistent": tok_consistent,
        "token_parity": dict(lane_result["token_parity"]),
        "sequence": {"ids": ids, "n_prompt": n_prompt, "n_generated": len(ids) - n_prompt},
        "reference_settings": dict(reference["settings"]),
        "determinism": {"lane": dict(lane_result.get("settings") or {}),
                        "reference": {"mode": mode,
                                      "threads": (reference["settings"].get("numpy") or {}).get("blas_threads"),
                                      "dtype": reference["settings"].get("dtype"),
                                      "kv_cache": reference["settings"].get("kv_cache")}},
        "thresholds": dict(thresholds),
        "metric_definitions": dict(metrics.METRIC_DEFINITIONS),
        "timings": {"lane": dict(lane_result.get("timings") or {}),
                    "reference": dict(reference.get("timings") or {})},
    }
    summary: dict[str, Any] = {"all_passed": False, "first_divergence": None, "mean_mse": None, "mean_kl": None}
    rows: list[dict[str, Any]] = []
    if not lane_result["token_parity"]["match"]:
        status = "token_mismatch"
        summary["reason"] = "token ids differ: no logits were computed for this lane"
        greedy = None
    elif lane_result.get("logits") is None:
        status = "error"
        summary["reason"] = "lane produced no logits"
        greedy = None
    else:
        ref_logits = np.asarray(reference["logits"], dtype=np.float32)
        lane_logits = np.asarray(lane_result["logits"], dtype=np.float32)
        if ref_logits.shape != lane_logits.shape:
            status = "error"
            summary["reason"] = f"logit shapes differ: reference {ref_logits.shape}, lane {lane_logits.shape}"
            greedy = None
        elif not np.all(np.isfinite(lane_logits)):
            bad = int(np.argmax(~np.all(np.isfinite(lane_logits), axis=1)))
            status = "fail"
            summary["reason"] = f"lane logits contain NaN/Inf (first at position {bad})"
            summary["first_divergence"] = {"pos": bad, "reasons": ["non-finite logits"]}
            greedy = None
        else:
            pos = metrics.compare_positions(ref_logits, lane_logits, ids)
            agg = metrics.aggregate(pos, ref_logits, lane_logits)
            greedy = metrics.greedy_agreement(ref_logits, lane_logits, ids, n_prompt)
            failures = []
            first = None
            for r in pos:
                f = position_failures(r, thresholds)
                row = r.as_row()
                row["passed"] = not f
                if f:
                    row["failures"] = f
                    if first is None:
                        first = {"pos": r.pos, "token_id": r.token_id, "reasons": f}
                rows.append(row)
            if first:
                failures.append(f"position {first['pos']}: {'; '.join(first['reasons'])}")
            if thresholds.get("mean_kl_max") is not None and agg["mean_kl"] > thresholds["mean_kl_max"]:
                failures.append(f"mean KL {agg['mean_kl']:.3g} > mean_kl_max {thresholds['mean_kl_max']}")
            rate = agg["same_top1"]["rate"]
            if thresholds.get("same_top1_min") is not None and rate is not None and rate < thresholds["same_top1_min"]:
                failures.append(f"same-top-1 rate {rate:.3f} < same_top1_min {thresholds['same_top1_min']}")
            if thresholds.get("greedy_contained") and greedy["n_generated"] and not greedy["all_contained"]:
                step = next(s for s in greedy["steps"] if not s["contained"])
                failures.append(f"greedy step {step['step']}: reference token {step['ref_token']} and lane token "
                                f"{step['lane_token']} are not in each other's top-5")
            summary.update(agg)
            summary["first_divergence"] = first
            summary["failures"] = failures
            status = "fail" if failures else "pass"
    if not tok_consistent and status == "pass":
        status = "tokenizer_inconsistent"
        summary["reason"] = "the lane's vocabulary differs from the reference tokenizer authority"
    receipt["positions"] = len(rows)
    receipt["rows"] = rows
    receipt["greedy"] = greedy
    gate_results = evaluate_gates({**receipt, "summary": summary, "status": status}, gates)
    receipt["gates"] = gate_results
    failed_gates = [g["expression"] for g in gate_results if not g["passed"]]
    if failed_gates and status == "pass":
        status = "fail"
    if failed_gates:
        summary.setdefault("failures", []).extend(f"gate failed: {e}" for e in failed_gates)
    summary["all_passed"] = status == "pass"
    hints = diagnose(status, receipt, summary, thresholds)
    if hints:
        summary["hints"] = hints
    receipt["summary"] = _clean(summary)
    receipt["status"] = status
    receipt["exit_code"] = STATUS_EXIT[status]
    receipt = _clean(receipt)
    receipt["content_sha256"] = content_hash(receipt)
    return receipt




def diagnose(status: str, receipt: Mapping[str, Any], summary: Mapping[str, Any],
             thresholds: Mapping[str, Any]) -> list[str]:
    """Plain-language pointers to the likely cause of a failure, from what the receipt records."""
    hints: list[str] = []
    ref = receipt.get("reference_settings") or {}
    lane = (receipt.get("determinism") or {}).get("lane") or {}
    if status == "fail" and ref.get("arch") in BITNET_ARCHS:
        act = ref.get("activation") or (ref.get("hparams") or {}).get("activation")
        source = (ref.get("hparams") or {}).get("activation_source")
        if act == "relu2":
            hints.append(
                f"the reference computes the BitNet FFN with relu2 (squared ReLU; chosen by: {source}), "
                "while mainline llama.cpp and BitNet.cpp's current code compute SiLU: a KL of order 1 is "
                "that difference. Set `activation: silu` on the model to compare the graph the engines "
                "compute, or keep relu2 to show they do not compute what the model was trained with.")
    if status == "fail" and lane.get("type_v") == "f16":
        hints.append("this lane ran with an F16 V cache (its llama.cpp generation refuses F32 V without "
                     "flash attention), which alone moves logits by NMSE ~1e-3")
    if status == "token_mismatch":
        tp = receipt.get("token_parity") or {}
        hints.append(f"the lane tokenized the formatted prompt differently from the tokenizer authority at "
                     f"position {tp.get('first_divergent_pos')} (reference {tp.get('ref_id')} "
                     f"{tp.get('ref_piece')!r}, lane {tp.get('lane_id')} {tp.get('lane_piece')!r}); compare "
                     "the tokenizer authority's source with the GGUF's own vocabulary (gguf_agreement)")
    return hints


def _clean(obj: Any) -> Any:
    """JSON-safe: numpy scalars to Python, non-finite floats to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return _finite(float(obj))
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def validate_receipt(receipt: Mapping[str, Any]) -> None:
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.validate(receipt, schema)


def upgrade_v1(old: Mapping[str, Any]) -> dict[str, Any]:
    """A v1 receipt (BitNet-rs crossval) in v2 shape; fields v1 never had are None."""
    r = copy.deepcopy(dict(old))
    rows = []
    for row in r.get("rows") or []:
        row = dict(row)
        row.setdefault("top5_ref", row.pop("top5_rust", None))
        row.setdefault("top5_lane", row.pop("top5_cpp", None))
        for k in ("token_id", "nmse", "cosine", "same_top1", "delta_p", "kl", "topk_agree"):
            row.setdefault(k, None)
        rows.append(row)
    r["rows"] = rows
    summary = dict(r.get("summary") or {})
    for k in ("all_passed", "first_divergence", "mean_mse", "mean_kl"):
        summary.setdefault(k, None)
    r["summary"] = summary
    for k in ("model_sha256", "tokenizer_authority", "lane_tokenizer_authority", "tokenizer_consistent",
              "prompt_template", "tokenization_contract", "determinism", "backend_identity",
              "reference_settings", "greedy", "token_parity", "metric_definitions", "status", "exit_code"):
        r.setdefault(k, None)
    if r["status"] is None and summary["all_passed"] is not None:
        r["status"] = "pass" if summary["all_passed"] else "fail"
        r["exit_code"] = STATUS_EXIT[r["status"]]
    r["upgraded_from_version"] = old.get("version", 1)
    r["version"] = SCHEMA_VERSION
    return r


def load_receipt(path: str | Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "version" not in data:
        raise ValueError(f"{path} is not a parity receipt (no 'version' field)")
    if int(data["version"]) == 1:
        return upgrade_v1(data)
    if int(data["version"]) != SCHEMA_VERSION:
        raise ValueError(f"{path}: receipt version {data['version']} is not supported (expected 1 or 2)")
    return data


def write_json(path: str | Path, obj: Any) -> None:
    """Deterministic JSON (sorted keys), written atomically: no half-written results."""
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False))
        fh.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are for everyone to read
    os.replace(tmp, path)
