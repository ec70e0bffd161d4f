"""Wiring: each op computed right from the wrong inputs is still wrong. The llama-family graph the model
declares fixes where a few inputs come from; checked here from the captured source links:

* the FFN activation reads the ``blk.L.ffn_gate`` projection and multiplies the ``blk.L.ffn_up`` one;
* a residual ADD adds a block's output (``blk.L.attn_output`` / ``blk.L.ffn_down`` projection) to that
  block's input - the tensor its pre-norm (RMS_NORM before ``attn_q`` / ``ffn_up``) normalized.

Pass-through ops (views, copies, row selection of the output rows, bitnet's per-matrix ``.scale`` MUL) are
followed back to the op that produced the data. A mismatch is recorded like an op parameter
(``{"param": "wiring", "engine": <what the engine read>, "model": <what the model declares>}``).
"""

from __future__ import annotations

from typing import Any

from parity_both.capture import Node

from .recompute import ACT_OPS, VIEW_OPS, Context


def origin(ctx: Context, s: dict[str, Any] | None) -> Node | None:
    """The node that produced a source's data, skipping pass-through ops."""
    while s is not None and s.get("node") is not None:
        n = ctx.by_i[int(s["node"])]
        passthrough = (
            n.op in VIEW_OPS
            or n.op in ("CPY", "DUP")
            or (n.op == "GET_ROWS" and not ctx.is_weight(ctx.src(n, 0)))
            or (n.op == "MUL" and ctx.is_weight(ctx.src(n, 1)) and str(ctx.src(n, 1)["name"]).endswith(".scale"))
        )
        if not passthrough:
            return n
        s = ctx.src(n, 0)
    return None


def weight_of(ctx: Context, n: Node | None) -> str | None:
    if n is None or n.op != "MUL_MAT":
        return None
    s = ctx.src(n, 0)
    return str(s["name"]) if ctx.is_weight(s) else None


def _label(ctx: Context, n: Node | None) -> str:
    if n is None:
        return "a leaf"
    w = weight_of(ctx, n)
    return f"{n.name} ({w})" if w else n.name


def block_input(ctx: Context, reader: str) -> Node | None:
    """The residual tensor a block starts from: what the RMS_NORM feeding weight `reader`'s matmul read."""
    mm = next((n for n in ctx.cap.nodes if n.op == "MUL_MAT" and weight_of(ctx, n) == reader), None)
    if mm is None:
        return None
    n = origin(ctx, ctx.src(mm, 1))
    if n is not None and n.op == "MUL" and ctx.is_weight(ctx.src(n, 1)):  # the norm's weight
        n = origin(ctx, ctx.src(n, 0))
    return origin(ctx, ctx.src(n, 0)) if n is not None and n.op == "RMS_NORM" else None


_BLOCKS = {"attn_output": "attn_q", "ffn_down": "ffn_up"}  # block output -> a weight its pre-norm feeds


def _check(ctx: Context, got: Node | None, want: Node | str | None) -> list[dict[str, Any]]:
    if want is None:
        return []
    ok = (weight_of(ctx, got) == want) if isinstance(want, str) else (got is not None and got.i == want.i)
    if ok:
        return []
    return [
        {"param": "wiring", "engine": _label(ctx, got), "model": want if isinstance(want, str) else _label(ctx, want)}
    ]


def _residual(ctx: Context, node: Node) -> list[dict[str, Any]]:
    a, b = origin(ctx, ctx.src(node, 0)), origin(ctx, ctx.src(node, 1))
    for out, other in ((a, b), (b, a)):
        w = weight_of(ctx, out) or ""
        parts = w.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCKS:
            want = block_input(ctx, f"blk.{parts[1]}.{_BLOCKS[parts[2]]}.weight")
            return _check(ctx, other, want)
    return []


def _layer(node: Node) -> int | None:
    return node.layer


def wiring(ctx: Context, node: Node) -> list[dict[str, Any]]:
    """Wiring mismatches of one node (empty when the node is not one the model's wiring constrains)."""
    layer = _layer(node)
    gate = None if layer is None else f"blk.{layer}.ffn_gate.weight"
    up = None if layer is None else f"blk.{layer}.ffn_up.weight"
    if node.op == "ADD":
        return _residual(ctx, node)
    if gate is None or not ctx.model.has(gate):
        return []
    if node.op in ("SWIGLU", "GEGLU", "REGLU") and ctx.src(node, 1) is not None:
        return _check(ctx, origin(ctx, ctx.src(node, 0)), gate) + _check(ctx, origin(ctx, ctx.src(node, 1)), up)
    if node.op in ACT_OPS:
        src = origin(ctx, ctx.src(node, 0))
        if src is not None and src.op in ACT_OPS:  # a later step of the chain (relu2's SQR)
            return []
        return _check(ctx, src, gate)
    if node.op == "MUL":
        a, b = origin(ctx, ctx.src(node, 0)), origin(ctx, ctx.src(node, 1))
        for act, other in ((a, b), (b, a)):
            if act is not None and act.op in ACT_OPS:
                return _check(ctx, other, up)
    return []
