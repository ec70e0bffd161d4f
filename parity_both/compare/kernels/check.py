"""The kernel check: every captured node of a lane recomputed (recompute.py, kvcache.py), compared with what
the lane computed, and judged against a per-op floor (floors.py). The result is the receipt's ``kernels``
section (deterministic JSON: no timings, floats at 6 significant digits, lists in evaluation order).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from parity_both.capture import Capture, Node, load_capture
from parity_both.gguf.reader import GGUFFile
from parity_both.reference.blas import fix_blas_threads

from .floors import FLOORS, floor_for, floor_key
from .kvcache import kv_expectations
from .model import KernelModel
from .recompute import HANDLERS, Context, Expect, SkipNode
from .wiring import wiring

SCHEMA = "parity-both/kernels/1"


def _g(x: float | None) -> float | str | None:
    """6 significant digits; non-finite values as strings (the section stays strict JSON)."""
    if x is None:
        return None
    return float(f"{x:.6g}") if np.isfinite(x) else str(x)


def difference(expected: np.ndarray, lane: np.ndarray) -> dict[str, Any]:
    """NMSE = sum (exp - lane)^2 / sum exp^2 and max |exp - lane| over the compared (non-NaN expected)
    elements, in float64; equal infinities count as equal."""
    e = np.asarray(expected, np.float64).reshape(-1)
    lane64 = np.asarray(lane, np.float64).reshape(-1)
    if e.size != lane64.size:
        raise SkipNode(f"expected {e.size} elements, lane holds {lane64.size}")
    keep = ~np.isnan(e)
    e, y = e[keep], lane64[keep]
    same_inf = np.isinf(e) & (e == y)
    e, y = np.where(same_inf, 0.0, e), np.where(same_inf, 0.0, y)
    if not (np.isfinite(e).all() and np.isfinite(y).all()):
        return {"nmse": float("inf"), "max_abs": float("inf"), "n": int(e.size)}
    d = e - y
    den, num = float(np.dot(e, e)), float(np.dot(d, d))
    nmse = num / den if den > 0 else (0.0 if num == 0 else float("inf"))
    return {"nmse": nmse, "max_abs": float(np.abs(d).max(initial=0.0)), "n": int(e.size)}


def _row(node: Node, exp: Expect, floors: Mapping[str, float]) -> dict[str, Any]:
    key = floor_key(node.op, exp.weight_type if node.op in ("MUL_MAT", "GET_ROWS") else None)
    row: dict[str, Any] = {
        "i": node.i,
        "name": node.name,
        "op": node.op,
        "layer": node.layer,
        "key": key,
        "weight": exp.weight,
        "weight_type": exp.weight_type,
        "params": exp.params,
        "note": exp.note,
    }
    if exp.skip is not None:
        return {**row, "verdict": "skip", "skip": exp.skip}
    floor = floor_for(key, floors)
    row.update(floor=floor)
    return row


def check_node(ctx: Context, node: Node, kv: Mapping[int, Expect], floors: Mapping[str, float]) -> dict[str, Any]:
    """One node: recompute, compare, judge."""
    if node.key is None:
        return _row(node, Expect(skip="no data captured for this node"), floors)
    handler = HANDLERS.get(node.op)
    if node.i in kv:
        exp = kv[node.i]
    elif handler is None:
        exp = Expect(skip=f"no model definition for op {node.op}")
    else:
        try:
            exp = handler(ctx, node)
        except SkipNode as e:
            exp = Expect(skip=str(e))
    if exp.skip is None:
        exp.params = exp.params + wiring(ctx, node)
    row = _row(node, exp, floors)
    if exp.skip is not None:
        return row
    try:
        lane = ctx.data(node.i)
        diff = difference(exp.value, lane)
        for label, value in exp.alternatives:  # another honest ggml path: the closest one counts
            other = difference(value, lane)
            if other["nmse"] < diff["nmse"]:
                diff, row["note"] = other, f"{row['note']}; {label}".lstrip("; ")
    except SkipNode as e:
        return {**row, "verdict": "skip", "skip": str(e)}
    if diff["n"] == 0:
        return {**row, "verdict": "skip", "skip": "no element to compare"}
    ok = diff["nmse"] <= row["floor"] and not exp.params
    return {**row, **diff, "verdict": "pass" if ok else "fail"}


def node_rows(cap: Capture, model: KernelModel, floors: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """Every captured node's row, in evaluation order."""
    floors = FLOORS if floors is None else floors
    fix_blas_threads()  # as the reference job: one BLAS thread unless the caller set a count (no spinning)
    ctx = Context(cap, model)
    kv = kv_expectations(ctx)
    return [check_node(ctx, node, kv, floors) for node in cap.nodes]


def _summary_row(r: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: r.get(k) for k in ("i", "name", "op", "layer", "key", "weight", "weight_type", "floor")}
    out.update(nmse=_g(r.get("nmse")), max_abs=_g(r.get("max_abs")), params=r.get("params") or [])
    return out


def diagnosis(first: Mapping[str, Any] | None, worst: Mapping[str, Any] | None) -> str:
    if first is None:
        if worst is None:
            return "nothing checked"
        return (
            f"rounding compounded: every op within floor (closest: {worst['key']} at {worst['name']}, "
            f"NMSE {worst['nmse']:.2g} vs floor {worst['floor']:.0e})"
        )
    if not np.isfinite(first.get("nmse", 0.0)):
        return f"{first['op']} at {first['name']} holds non-finite values where the model's are finite"
    if first.get("params"):
        p = first["params"][0]
        if p["param"] == "wiring":
            return (
                f"{first['op']} wiring differs from the model at {first['name']}: the engine reads "
                f"{p['engine']}, the model {p['model']}"
            )
        return (
            f"{first['op']} {p['param']} differs from the model at {first['name']}: engine {p['engine']}, "
            f"model {p['model']} (NMSE {first.get('nmse', float('nan')):.2g})"
        )
    where = first["weight"][: -len(".weight")] if str(first.get("weight") or "").endswith(".weight") else None
    nm = f"NMSE {first['nmse']:.2g} at {where or first['name']} (floor {first['floor']:.0e})"
    if first["op"] == "MUL_MAT" and where:
        return f"{first['weight_type']} vec_dot disagrees: {nm}"
    if first["op"] == "GET_ROWS" and where:
        return f"{first['weight_type']} dequantization (get_rows) disagrees: {nm}"
    return f"{first['op']} disagrees: {nm}"


def summarize(
    rows: list[dict[str, Any]], model: KernelModel, engine: str, floors: Mapping[str, float]
) -> dict[str, Any]:
    checked = [r for r in rows if r["verdict"] != "skip"]
    per_key: dict[str, dict[str, Any]] = {}
    for r in checked:
        e = per_key.setdefault(r["key"], {"nodes": 0, "failed": 0, "worst": None, "least_failing": None})
        e["nodes"] += 1
        e["failed"] += r["verdict"] == "fail"
        if r["verdict"] == "fail" and (e["least_failing"] is None or r["nmse"] < e["least_failing"]):
            e["least_failing"] = r["nmse"]
        if e["worst"] is None or r["nmse"] > e["worst"]["nmse"]:
            e["worst"] = r
    skipped: dict[str, int] = {}
    for r in rows:
        if r["verdict"] == "skip":
            skipped[r["skip"]] = skipped.get(r["skip"], 0) + 1
    failures = [r for r in checked if r["verdict"] == "fail"]
    first = failures[0] if failures else None
    closest = max(checked, key=lambda r: r["nmse"] / r["floor"], default=None)
    return {
        "schema": SCHEMA,
        "engine": engine,
        "model": model.declared(),
        "status": "fail" if failures else "pass",
        "diagnosis": diagnosis(first, closest),
        "first_failure": None if first is None else _summary_row(first),
        "failures": [_summary_row(r) for r in failures[:20]],
        "counts": {
            "nodes": len(rows),
            "checked": len(checked),
            "failed": len(failures),
            "skipped": len(rows) - len(checked),
            "skipped_by_reason": dict(sorted(skipped.items())),
        },
        "per_op": {
            k: {
                "nodes": v["nodes"],
                "failed": v["failed"],
                "floor": v["worst"]["floor"],
                "worst": _summary_row(v["worst"]),
                "least_failing_nmse": _g(v["least_failing"]),
            }
            for k, v in sorted(per_key.items())
        },
        "floors": {k: floors[k] for k in sorted({r["key"] for r in checked} & set(floors))},
    }


def check_kernels(
    capture: Capture | str | Path,
    model: KernelModel | GGUFFile | str | Path,
    *,
    floors: Mapping[str, float] | None = None,
    activation: str | None = None,
) -> dict[str, Any]:
    """The receipt's ``kernels`` section for one lane capture (made on the original, quantized model)."""
    cap = capture if isinstance(capture, Capture) else load_capture(capture)
    km = model if isinstance(model, KernelModel) else KernelModel.open(model, activation)
    floors = FLOORS if floors is None else floors
    rows = node_rows(cap, km, floors)
    return summarize(rows, km, str(cap.index.get("engine", "")), floors)
