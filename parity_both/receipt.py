"""Parity receipts (schema v3): what was compared, how, and the verdicts.

A receipt compares one lane with the reference for one prompt, twice: `quantized` (both evaluate the
model file itself) and `graph` (both evaluate the model's lossless twin, every tensor dequantized,
where an honest engine agrees to ~1e-7 and a graph bug stands out). Each verdict section has its
files, sequence, thresholds, per-position rows, greedy agreement, summary and status; the receipt's
status passes only if both pass (a twin that was not evaluated is `skipped`, not failed).
Around them: the tokenizer authority on both sides, the prompt template and contract, determinism
settings, the model's SHA-256, the backend identity, the reference settings and the metric
definitions. `content_sha256` covers everything except the timestamp and timings, so a rerun that
computes the same numbers yields the same content hash. v1 (BitNet-rs crossval) and v2 receipts load
upgraded to this shape (`load_receipt`).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from parity_both import metrics
from parity_both.gguf.constants import BITNET_ARCHS

SCHEMA_VERSION = 3
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "receipt.schema.json"
VOLATILE_KEYS = ("timestamp", "timings", "content_sha256")
VERDICTS = ("graph", "quantized")  # the order verdicts are reported in (graph first: engine bugs)
TWIN_OFF_REASON = "no lossless twin was evaluated for this model (twin: off)"

# Lane status -> exit code contribution (the seed's table), and statuses from least to most severe.
STATUS_EXIT = {"pass": 0, "fail": 1, "token_mismatch": 2, "tokenizer_inconsistent": 2, "error": 2}
SEVERITY = ("pass", "fail", "error", "tokenizer_inconsistent", "token_mismatch")


def worst(statuses: Sequence[str]) -> str:
    """The most severe status ("pass" for none)."""
    return max(statuses, key=SEVERITY.index, default="pass")


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


@dataclass(frozen=True)
class Evaluation:
    """The reference and the lane on one file: `reference` as pipeline.load_reference gives it
    (ids, logits, n_prompt, settings, timings), `lane` as pipeline.load_lane (token_parity, logits or
    None, settings, identity, timings, timestamp), `files` what each side evaluated."""

    reference: Mapping[str, Any]
    lane: Mapping[str, Any]
    files: Mapping[str, Any] = field(default_factory=dict)


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

    doc = json.loads(canonical_json(_clean(receipt)))
    results = []
    for expr in gates:
        try:
            values = jq.compile(expr).input_value(doc).all()
            ok = bool(values) and all(v is True for v in values)
            results.append({"expression": expr, "passed": ok, "values": values[:5]})
        except ValueError as e:  # jq compile or runtime error: the gate fails, with the reason
            results.append({"expression": expr, "passed": False, "error": str(e).splitlines()[0]})
    return results


# -- one verdict ------------------------------------------------------------------------------
def _unusable(ev: Evaluation) -> tuple[str, dict[str, Any]] | None:
    """(status, summary) when the lane's logits cannot be compared, else None."""
    if not ev.lane["token_parity"]["match"]:
        return "token_mismatch", {"reason": "token ids differ: no logits were computed for this lane"}
    if ev.lane.get("logits") is None:
        return "error", {"reason": "lane produced no logits"}
    ref = np.asarray(ev.reference["logits"])
    lane = np.asarray(ev.lane["logits"])
    if ref.shape != lane.shape:
        return "error", {"reason": f"logit shapes differ: reference {ref.shape}, lane {lane.shape}"}
    if not np.all(np.isfinite(lane)):
        bad = int(np.argmax(~np.all(np.isfinite(lane), axis=1)))
        return "fail", {
            "reason": f"lane logits contain NaN/Inf (first at position {bad})",
            "first_divergence": {"pos": bad, "reasons": ["non-finite logits"]},
        }
    return None


def _threshold_failures(
    agg: Mapping[str, Any], greedy: Mapping[str, Any], first: Mapping[str, Any] | None, th: Mapping[str, Any]
) -> list[str]:
    failures = []
    if first:
        failures.append(f"position {first['pos']}: {'; '.join(first['reasons'])}")
    if th.get("mean_kl_max") is not None and agg["mean_kl"] > th["mean_kl_max"]:
        failures.append(f"mean KL {agg['mean_kl']:.3g} > mean_kl_max {th['mean_kl_max']}")
    rate = agg["same_top1"]["rate"]
    if th.get("same_top1_min") is not None and rate is not None and rate < th["same_top1_min"]:
        failures.append(f"same-top-1 rate {rate:.3f} < same_top1_min {th['same_top1_min']}")
    if th.get("greedy_contained") and greedy["n_generated"] and not greedy["all_contained"]:
        step = next(s for s in greedy["steps"] if not s["contained"])
        failures.append(
            f"greedy step {step['step']}: reference token {step['ref_token']} and lane token "
            f"{step['lane_token']} are not in each other's top-5"
        )
    return failures


def _judge(ev: Evaluation, th: Mapping[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """(rows, greedy, summary) of comparable logits under the thresholds `th`."""
    ids = [int(i) for i in ev.reference["ids"]]
    ref = np.asarray(ev.reference["logits"], dtype=np.float32)
    lane = np.asarray(ev.lane["logits"], dtype=np.float32)
    pos = metrics.compare_positions(ref, lane, ids)
    greedy = metrics.greedy_agreement(ref, lane, ids, int(ev.reference["n_prompt"]))
    rows, first = [], None
    for r in pos:
        fails = position_failures(r, th)
        row = {**r.as_row(), "passed": not fails}
        if fails:
            row["failures"] = fails
            if first is None:
                first = {"pos": r.pos, "token_id": r.token_id, "reasons": fails}
        rows.append(row)
    agg = metrics.aggregate(pos, ref, lane)
    summary = {**agg, "first_divergence": first, "failures": _threshold_failures(agg, greedy, first, th)}
    return rows, greedy, summary


def verdict(ev: Evaluation, th: Mapping[str, Any]) -> dict[str, Any]:
    """One verdict section: the lane against the reference on `ev.files`, under thresholds `th`."""
    ids = [int(i) for i in ev.reference["ids"]]
    n_prompt = int(ev.reference["n_prompt"])
    section: dict[str, Any] = {
        "files": dict(ev.files),
        "thresholds": dict(th),
        "sequence": {"ids": ids, "n_prompt": n_prompt, "n_generated": len(ids) - n_prompt},
        "rows": [],
        "greedy": None,
        "summary": {"first_divergence": None, "failures": [], "mean_mse": None, "mean_kl": None},
    }
    problem = _unusable(ev)
    if problem:
        section["status"] = problem[0]
        section["summary"].update(problem[1])
    else:
        section["rows"], section["greedy"], section["summary"] = _judge(ev, th)
        section["status"] = "fail" if section["summary"]["failures"] else "pass"
    section["positions"] = len(section["rows"])
    return section


# -- the receipt ------------------------------------------------------------------------------
def _context(
    *,
    lane: str,
    model_name: str,
    model: Mapping[str, Any],
    authority: Mapping[str, Any],
    lane_vocab: Mapping[str, Any],
    prompt: Mapping[str, Any],
    backend: Mapping[str, Any],
    mode: str,
    ev: Evaluation,
) -> dict[str, Any]:
    """Everything the two verdicts share: what was compared, by whom, under which settings."""
    ref_settings = ev.reference["settings"]
    return {
        "version": SCHEMA_VERSION,
        "timestamp": ev.lane.get("timestamp"),
        "model": model["path"],
        "model_name": model_name,
        "model_sha256": model["sha256"],
        "model_facts": {
            k: model.get(k) for k in ("architecture", "file_name", "size_bytes", "quant_types", "type_numbering")
        },
        "backend": lane,
        # what the backend rule provisioned, plus what the engine said about itself while running
        "backend_identity": {**dict(backend.get("identity") or {}), "runtime": dict(ev.lane.get("identity") or {})},
        "prompt": prompt_text(prompt),
        "prompt_name": prompt["prompt"]["name"],
        "corpus": corpus_facts(prompt),
        "prompt_template": {
            "requested": prompt["template"]["requested"],
            "used": prompt["template"]["used"],
            "evidence": prompt["template"]["evidence"],
            "notes": prompt["template"]["notes"],
            "system_prompt": prompt["prompt"].get("system_prompt"),
            "formatted": prompt["formatted"],
        },
        "tokenization_contract": prompt["contract"],
        "prompt_context": prompt.get("context"),  # context length, and whether the prompt was cut to fit
        "tokenizer_authority": dict(authority),
        "lane_tokenizer_authority": dict(lane_vocab),
        "tokenizer_consistent": lane_vocab.get("vocab_hash") == authority.get("vocab_hash"),
        "token_parity": dict(ev.lane["token_parity"]),
        "reference_settings": dict(ref_settings),
        "determinism": {
            "lane": dict(ev.lane.get("settings") or {}),
            "reference": {
                "mode": mode,
                "threads": (ref_settings.get("numpy") or {}).get("blas_threads"),
                "dtype": ref_settings.get("dtype"),
                "kv_cache": ref_settings.get("kv_cache"),
            },
        },
        "metric_definitions": dict(metrics.METRIC_DEFINITIONS),
    }


def _overall(sections: Mapping[str, Mapping[str, Any]], tokenizer_consistent: bool) -> tuple[str, dict[str, Any]]:
    """The receipt's status and summary from its verdicts: it passes only if every evaluated verdict
    passes. mean_mse/mean_kl are the quantized verdict's (the seed's comparison, on the model file)."""
    evaluated = [v for v in VERDICTS if sections[v]["status"] != "skipped"]
    status = worst([sections[v]["status"] for v in evaluated])
    q = sections["quantized"]["summary"]
    summary: dict[str, Any] = {
        "verdicts": {v: sections[v]["status"] for v in VERDICTS},
        "first_divergence": next(
            (
                {"verdict": v, **sections[v]["summary"]["first_divergence"]}
                for v in evaluated
                if sections[v]["summary"].get("first_divergence")
            ),
            None,
        ),
        "mean_mse": q.get("mean_mse"),
        "mean_kl": q.get("mean_kl"),
        "failures": [f"{v}: {f}" for v in evaluated for f in sections[v]["summary"].get("failures") or []],
    }
    reasons = [f"{v}: {sections[v]['summary']['reason']}" for v in evaluated if sections[v]["summary"].get("reason")]
    if reasons:
        summary["reason"] = "; ".join(reasons)
    kernels = sections.get("kernels")
    if kernels is not None:
        summary["verdicts"]["kernels"] = kernels["status"]
        if kernels["status"] == "fail":
            summary["failures"].append(f"kernels: {kernels.get('diagnosis')}")
            status = worst([status, "fail"])
    if not tokenizer_consistent and status == "pass":
        status = "tokenizer_inconsistent"
        summary["reason"] = "the lane's vocabulary differs from the reference tokenizer authority"
    return status, summary


def build_receipt(
    *,
    lane: str,
    model_name: str,
    model: Mapping[str, Any],
    authority: Mapping[str, Any],
    lane_vocab: Mapping[str, Any],
    prompt: Mapping[str, Any],
    backend: Mapping[str, Any],
    mode: str,
    quantized: Evaluation,
    thresholds: Mapping[str, Any],
    graph: Evaluation | None = None,
    graph_thresholds: Mapping[str, Any] | None = None,
    graph_skipped_reason: str = TWIN_OFF_REASON,
    gates: Sequence[str] = (),
    localization: Mapping[str, Any] | None = None,
    kernels: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The complete receipt, hashed once. `quantized`: both sides on the model file, judged by
    `thresholds`; `graph`: both sides on the lossless twin, judged by `graph_thresholds` (None: the
    graph verdict is skipped for `graph_skipped_reason`)."""
    receipt = _context(
        lane=lane,
        model_name=model_name,
        model=model,
        authority=authority,
        lane_vocab=lane_vocab,
        prompt=prompt,
        backend=backend,
        mode=mode,
        ev=quantized,
    )
    receipt["quantized"] = verdict(quantized, thresholds)
    receipt["timings"] = {
        "quantized": {
            "lane": dict(quantized.lane.get("timings") or {}),
            "reference": dict(quantized.reference.get("timings") or {}),
        }
    }
    if graph is None:
        receipt["graph"] = {"status": "skipped", "reason": graph_skipped_reason}
    else:
        if graph_thresholds is None:
            raise ValueError("a graph evaluation needs graph_thresholds")
        receipt["graph"] = verdict(graph, graph_thresholds)
        receipt["timings"]["graph"] = {
            "lane": dict(graph.lane.get("timings") or {}),
            "reference": dict(graph.reference.get("timings") or {}),
        }
    if localization is not None:
        receipt["localization"] = dict(localization)
    if kernels is not None:
        receipt["kernels"] = dict(kernels)
    status, summary = _overall(receipt, receipt["tokenizer_consistent"])
    receipt["gates"] = evaluate_gates({**receipt, "summary": summary, "status": status}, gates)
    failed_gates = [g["expression"] for g in receipt["gates"] if not g["passed"]]
    if failed_gates and status == "pass":
        status = "fail"
    summary["failures"] += [f"gate failed: {e}" for e in failed_gates]
    summary["all_passed"] = status == "pass"
    hints = diagnose(status, receipt)
    if hints:
        summary["hints"] = hints
    receipt.update(summary=summary, status=status, exit_code=STATUS_EXIT[status])
    receipt = _clean(receipt)
    receipt["content_sha256"] = content_hash(receipt)
    return receipt


def _localization_hints(loc: Mapping[str, Any] | None) -> list[str]:
    """Where localization found the lane departing from the reference on the twin."""
    if not loc or loc.get("status") != "departs":
        return []
    node = loc["first_node"]
    at = f"layer {loc['first_layer']}, " if loc.get("first_layer") is not None else ""
    return [
        f"on the lossless twin the lane first departs from the reference at {at}node {node['name']} "
        f"({node['op']}{', occurrence ' + str(node['occurrence'] + 1) if node['occurrence'] else ''}): "
        f"NMSE {node['nmse']:.3g} (floor {loc['floor_nmse']:.3g}); captures in {loc.get('captures')}"
    ]


def diagnose(status: str, receipt: Mapping[str, Any]) -> list[str]:
    """Plain-language pointers to the likely cause of a failure, from what the receipt records."""
    hints = _localization_hints(receipt.get("localization"))
    graph, quantized = receipt["graph"]["status"], receipt["quantized"]["status"]
    if graph == "pass" and quantized == "fail":
        hints.append(
            "the lane computes the same graph as the reference on the lossless twin: the quantized "
            "difference comes from the weight types' kernels and rounding, not from the graph"
        )
    if graph == "fail" and quantized == "pass":
        hints.append(
            "the lane's graph differs from the reference's on the lossless twin although the quantized "
            "comparison passes: the quantization noise hides a graph difference there"
        )
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
                "compute, or keep relu2 to show they do not compute what the model was trained with."
            )
    if status == "fail" and lane.get("type_v") == "f16":
        hints.append(
            "this lane ran with an F16 V cache (its llama.cpp generation refuses F32 V without "
            "flash attention), which alone moves logits by NMSE ~1e-3"
        )
    if status == "token_mismatch":
        tp = receipt.get("token_parity") or {}
        hints.append(
            f"the lane tokenized the formatted prompt differently from the tokenizer authority at "
            f"position {tp.get('first_divergent_pos')} (reference {tp.get('ref_id')} "
            f"{tp.get('ref_piece')!r}, lane {tp.get('lane_id')} {tp.get('lane_piece')!r}); compare "
            "the tokenizer authority's source with the GGUF's own vocabulary (gguf_agreement)"
        )
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


def prompt_text(prompt: Mapping[str, Any]) -> str:
    """The prompt as the receipt states it: its text, or for a corpus prompt which windows of which file."""
    meta = prompt["prompt"]
    if meta.get("corpus"):
        return f"corpus {meta['corpus']}: {meta['windows']} window(s) of {meta['window']} tokens"
    return str(meta["text"])


def corpus_facts(prompt: Mapping[str, Any]) -> dict[str, Any] | None:
    meta = prompt["prompt"]
    if not meta.get("corpus"):
        return None
    return {
        "path": meta["corpus"],
        "sha256": meta["corpus_sha256"],
        "window": meta["window"],
        "windows": meta["windows"],
        "window_starts": list(prompt["window_starts"]),
    }


def validate_receipt(receipt: Mapping[str, Any]) -> None:
    """jsonschema.validate against the v3 schema, without re-checking the schema itself on every call
    (it is checked once per process); raises the same best-matching ValidationError."""
    from jsonschema.exceptions import best_match

    error = best_match(_receipt_validator().iter_errors(receipt))
    if error is not None:
        raise error


@functools.cache
def _receipt_validator() -> Any:
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


V1_SCHEMA_PATH = SCHEMA_PATH.with_name("receipt.v1.schema.json")


def validate_v1(receipt: Mapping[str, Any], where: object = "receipt") -> None:
    """ValueError unless `receipt` is a well-formed v1 receipt (schemas/receipt.v1.schema.json)."""
    import jsonschema

    try:
        jsonschema.validate(receipt, json.loads(V1_SCHEMA_PATH.read_text()))
    except jsonschema.ValidationError as e:
        at = "/".join(str(k) for k in e.absolute_path) or "(top level)"
        raise ValueError(f"{where}: not a valid v1 receipt: {at}: {e.message}") from None


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
    for k in (
        "model_sha256",
        "tokenizer_authority",
        "lane_tokenizer_authority",
        "tokenizer_consistent",
        "prompt_template",
        "tokenization_contract",
        "determinism",
        "backend_identity",
        "reference_settings",
        "greedy",
        "token_parity",
        "metric_definitions",
        "status",
        "exit_code",
    ):
        r.setdefault(k, None)
    if r["status"] is None:
        r["status"] = {True: "pass", False: "fail", None: "error"}[summary["all_passed"]]
        r["exit_code"] = STATUS_EXIT[r["status"]]
    return r


def upgrade_v2(old: Mapping[str, Any]) -> dict[str, Any]:
    """A v2 receipt (one comparison, on the model file) in v3 shape: that comparison becomes the
    `quantized` verdict; the graph verdict did not exist yet (`skipped`)."""
    r = copy.deepcopy(dict(old))
    summary = dict(r.get("summary") or {})
    # v2's tokenizer_inconsistent was a verdict on top of a comparison that passed
    q_status = "pass" if r["status"] == "tokenizer_inconsistent" else r["status"]
    files = r.pop("evaluated_files", None) or {"reference": r.get("model"), "lane": r.get("model")}
    r["quantized"] = {
        "status": q_status,
        "files": files,
        "sequence": r.pop("sequence", None),
        "thresholds": r.pop("thresholds", None),
        "positions": r.pop("positions", len(r.get("rows") or [])),
        "rows": r.pop("rows", None) or [],
        "greedy": r.pop("greedy", None),
        "summary": {k: v for k, v in summary.items() if k not in ("all_passed", "hints")},
    }
    r["graph"] = {"status": "skipped", "reason": f"receipt v{old.get('version')} predates the graph verdict"}
    # v3's top-level summary keeps only the verdicts and the headline numbers (the rest is quantized's)
    top = {k: summary[k] for k in ("all_passed", "failures", "mean_mse", "mean_kl", "reason") if k in summary}
    first = summary.get("first_divergence")
    top["first_divergence"] = {"verdict": "quantized", **first} if first else None
    top["verdicts"] = {"graph": "skipped", "quantized": q_status}
    r["summary"] = top
    r["version"] = SCHEMA_VERSION
    return r


def load_receipt(path: str | Path) -> dict[str, Any]:
    """A receipt of any schema version in the current shape; older ones say `upgraded_from_version`."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "version" not in data:
        raise ValueError(f"{path} is not a parity receipt (no 'version' field)")
    version = data["version"]
    if version not in (1, 2, SCHEMA_VERSION):
        raise ValueError(f"{path}: receipt version {version} is not supported (expected 1, 2 or {SCHEMA_VERSION})")
    if version == 1:
        validate_v1(data, path)
        data = upgrade_v1(data)
    if version in (1, 2):
        data = upgrade_v2(data)
        data["upgraded_from_version"] = version
    return data


def write_json(path: str | Path, obj: Any) -> None:
    """Deterministic JSON (sorted keys), written atomically: no half-written results."""
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False))
            fh.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:  # e.g. a full disk: the previous file stays, no temporary is left
        Path(tmp).unlink(missing_ok=True)
        raise
