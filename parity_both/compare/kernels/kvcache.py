"""KV-cache views read by attention: what they must hold is what the model wrote there - the layer's roped K
(or its V) for positions 0..n-1, rounded to the cache type - whatever view/permute chain the engine reads it
through. Cells beyond the sequence are not compared.

Assumes the capture's batch layout (one sequence, positions 0..n-1 written to cells 0..n-1 of a fresh cache),
which is the batch every lane's capture uses.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from parity_both.capture import Node

from .recompute import NAN, VIEW_OPS, Context, Expect, SkipNode, cache_leaf, permutation, round_to, shape4


def _written(ctx: Context, before: int, name: str, op: str | None) -> Node:
    """The last node called `name` (with op `op` when given) evaluated before node `before`."""
    found = [n for n in ctx.cap.nodes if n.i < before and n.name == name and (op is None or n.op == op)]
    if not found:
        raise SkipNode(f"no captured {name!r}{f' {op}' if op else ''} node to compare the cache view with")
    return found[-1]


def _operand(ctx: Context, attn: Node, operand: Node, kind: str, layer: int, ctype: str) -> np.ndarray:
    shape = shape4(operand.ne)
    t = ctx.n_tokens
    if kind == "k":
        src = _written(ctx, attn.i, f"Kcur-{layer}", "ROPE")
        _, hkv, n_kv, hd = shape
    else:
        src = _written(ctx, attn.i, f"Vcur-{layer}", None)
        _, hkv, hd, n_kv = shape
    x = ctx.data(src.i)
    if x.size != t * hkv * hd or n_kv < t:
        raise SkipNode(
            f"{kind.upper()} cache view {list(operand.ne)} does not hold {src.name} ({list(src.ne)}) for {t} positions"
        )
    x = round_to(x.reshape(t, hkv, hd), ctype)
    e = np.full(shape, NAN, dtype=np.float32)
    if kind == "k":
        e[0, :, :t, :] = x.transpose(1, 0, 2)
    else:
        e[0, :, :, :t] = x.transpose(1, 2, 0)
    return e


def _chain(ctx: Context, node: Node) -> tuple[list[Node], tuple[str, int, str]] | None:
    """The view nodes from an attention matmul's src0 back to a KV-cache leaf (src0 first)."""
    path: list[Node] = []
    s = ctx.src(node, 0)
    while s is not None and s.get("node") is not None:
        n = ctx.by_i[int(s["node"])]
        if n.op not in VIEW_OPS:
            return None
        path.append(n)
        s = ctx.src(n, 0)
    root = cache_leaf(s)
    return (path, root) if path and root is not None else None


def kv_expectations(ctx: Context, only: Collection[int] | None = None) -> dict[int, Expect]:
    """Expected content of every view node between a KV-cache leaf and the attention matmul reading it
    (of the chains through the nodes `only`, when given)."""
    out: dict[int, Expect] = {}
    for node in ctx.cap.nodes:
        if node.op != "MUL_MAT":
            continue
        found = _chain(ctx, node)
        if found is None or (only is not None and not {n.i for n in found[0]} & set(only)):
            continue
        path, (kind, layer, ctype) = found
        note = f"KV cache view: {kind.upper()} of layer {layer} as written for the sequence, rounded to {ctype}"
        try:
            e = _operand(ctx, node, path[0], kind, layer, ctype)
        except SkipNode as ex:
            out.update({n.i: Expect(skip=str(ex)) for n in path})
            continue
        out[path[0].i] = Expect(e, note=note)
        for prev, n in zip(path, path[1:], strict=False):  # walk back from the consumer
            if prev.op == "PERMUTE":
                e = np.transpose(e, np.argsort(permutation(prev)))
            elif prev.op == "TRANSPOSE":
                e = e.swapaxes(-1, -2)
            elif e.size == int(np.prod(shape4(n.ne))):
                e = e.reshape(shape4(n.ne))
            else:
                out[n.i] = Expect(skip=f"{prev.op} of a KV-cache view changes the element count")
                break
            out[n.i] = Expect(e, note=note)
    return out
