"""Localization: which layer and which node of a lane's graph first departs from the reference.

Both sides write the capture format (parity_both.capture) under llama.cpp's node names. Nodes are paired
by (name, occurrence): llama.cpp reuses a name for consecutive nodes (``Qcur-3`` after the matmul and after
RoPE) and the reference emits them in the same order. Per pair: NMSE = sum (ref - lane)^2 / sum ref^2 and
max |ref - lane| over the elements both sides hold. The first node in evaluation order whose NMSE is above
the floor is where the departure starts; the residual stream ``l_out-i`` gives the per-layer picture.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from parity_both.capture import Capture, Node

# Nodes summarised per layer (block outputs); every paired node is still compared.
BLOCK_OUTPUTS = ("kqv_out", "ffn_out", "l_out")


def _align(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, str] | None:
    """The elements both tensors hold, or None when they cannot be lined up.

    Equal sizes compare element by element (a reshape changes ne, not the data order). Otherwise the lane
    may hold more along an axis (llama.cpp pads the KV length of kq/kq_soft_max to a multiple of 32 or 256):
    compare the reference's extent of each axis."""
    if a.size == b.size:
        return a.reshape(-1), b.reshape(-1), ""
    nd = max(a.ndim, b.ndim)  # ggml's trailing ne of 1 may be kept by one side and dropped by the other
    a, b = a.reshape((1,) * (nd - a.ndim) + a.shape), b.reshape((1,) * (nd - b.ndim) + b.shape)
    if a.ndim == b.ndim and all(x <= y for x, y in zip(a.shape, b.shape, strict=True)):
        sl = tuple(slice(0, x) for x in a.shape)
        return a.reshape(-1), b[sl].reshape(-1), f"lane {list(b.shape)} cut to reference {list(a.shape)}"
    return None


def node_difference(a: np.ndarray, b: np.ndarray) -> dict[str, Any] | None:
    """NMSE and max |delta| of two captured tensors (float64; equal infinities count as equal)."""
    lined = _align(np.asarray(a, np.float64), np.asarray(b, np.float64))
    if lined is None:
        return None
    x, y, note = lined
    same_inf = np.isinf(x) & (x == y)
    x = np.where(same_inf, 0.0, x)
    y = np.where(same_inf, 0.0, y)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return {"nmse": float("inf"), "max_abs": float("inf"), "note": "non-finite values", "n": int(x.size)}
    d = x - y
    denom = float(np.dot(x, x))
    num = float(np.dot(d, d))
    nmse = num / denom if denom > 0 else (0.0 if num == 0 else float("inf"))
    return {"nmse": nmse, "max_abs": float(np.abs(d).max(initial=0.0)), "note": note, "n": int(x.size)}


def pair_nodes(ref: Capture, lane: Capture) -> tuple[list[tuple[Node, Node]], list[str]]:
    """(reference node, lane node) pairs in the reference's evaluation order, and reference nodes the lane
    does not have."""
    lane_nodes = {(name, k): node for name, k, node in lane.named()}
    pairs, missing = [], []
    for name, k, node in ref.named():
        other = lane_nodes.get((name, k))
        if other is None:
            missing.append(name if k == 0 else f"{name}#{k}")
        else:
            pairs.append((node, other))
    return pairs, missing


def _row(rnode: Node, k: int, diff: Mapping[str, Any]) -> dict[str, Any]:
    return {"name": rnode.name, "occurrence": k, "op": rnode.op, "layer": rnode.layer, **diff}


def compare_captures(ref: Capture, lane: Capture) -> list[dict[str, Any]]:
    """One row per paired node, in evaluation order."""
    rows: list[dict[str, Any]] = []
    pairs, _ = pair_nodes(ref, lane)
    seen: dict[str, int] = {}
    for rnode, lnode in pairs:
        k = seen.get(rnode.name, 0)
        seen[rnode.name] = k + 1
        diff = node_difference(ref.data(rnode), lane.data(lnode))
        if diff is None:
            diff = {
                "nmse": None,
                "max_abs": None,
                "n": 0,
                "note": f"shapes cannot be lined up: reference {list(rnode.ne)}, lane {list(lnode.ne)}",
            }
        rows.append(_row(rnode, k, diff))
    return rows


def _per_layer(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    layers: dict[int, dict[str, Any]] = {}
    for r in rows:
        if r["layer"] is None or r["nmse"] is None:
            continue
        entry = layers.setdefault(r["layer"], {"layer": r["layer"], "worst_node": None, "worst_nmse": -1.0})
        base = r["name"].rsplit("-", 1)[0]
        if base in BLOCK_OUTPUTS:
            entry[f"{base}_nmse"] = max(entry.get(f"{base}_nmse", 0.0), r["nmse"])
        if r["nmse"] > entry["worst_nmse"]:
            entry["worst_node"], entry["worst_nmse"] = r["name"], r["nmse"]
    return [layers[i] for i in sorted(layers)]


def localize(ref: Capture, lane: Capture, floor: float) -> dict[str, Any]:
    """The receipt's ``localization`` section: NMSE per layer for the residual stream and block outputs, the
    first layer whose residual NMSE is above ``floor``, and the node where the departure starts."""
    rows = compare_captures(ref, lane)
    _, missing = pair_nodes(ref, lane)
    layers = _per_layer(rows)
    first_node = next((r for r in rows if r["nmse"] is not None and r["nmse"] > floor), None)
    first_layer = next((e["layer"] for e in layers if e.get("l_out_nmse", 0.0) > floor), None)
    if first_node is not None and first_node["layer"] is not None:
        # the layer where it starts, even when the residual stream recovers within that layer's floor
        first_layer = first_node["layer"] if first_layer is None else min(first_layer, first_node["layer"])
    return {
        "floor_nmse": floor,
        "nodes_compared": sum(r["nmse"] is not None for r in rows),
        "nodes_missing_in_lane": missing,
        "status": "departs" if first_node is not None else "within_floor",
        "first_layer": first_layer,
        "first_node": first_node,
        "layers": layers,
        "worst_nodes": sorted((r for r in rows if r["nmse"] is not None), key=lambda r: -r["nmse"])[:10],
    }
