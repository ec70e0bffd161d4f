"""Each captured node recomputed from the lane's own captured sources, with the reference's definition of
its op and the parameters the model declares (model.py) - never the op's own op_params, which are only
compared against the model's values.

Arrays are 4-D with numpy shape reversed(ne) (as the capture stores them). An expected value may hold NaN
where the element is not compared (KV cells beyond the sequence, rows a SET_ROWS does not write).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from parity_both.capture import Capture, Node
from parity_both.gguf.quants import dequantize
from parity_both.reference import ops
from parity_both.reference.ggml_emul import exact_linear, ggml_linear, round_bf16, round_fp16, vec_dot_type

from .model import ACTIVATION_CHAIN, GLU_OP, KernelModel, row_nbytes

F32 = np.float32
NAN = np.float32(np.nan)
VIEW_OPS = ("VIEW", "RESHAPE", "PERMUTE", "TRANSPOSE", "CONT")
ACT_OPS = ("SILU", "GELU", "GELU_QUICK", "GELU_ERF", "RELU", "SQR", "TANH", "SIGMOID")
_CACHE = re.compile(r"^cache_([kv])_l(\d+)$")
GLU_NAMES = {0: "REGLU", 1: "GEGLU", 2: "SWIGLU", 3: "SWIGLU_OAI", 4: "GEGLU_ERF", 5: "GEGLU_QUICK"}


@dataclass
class Expect:
    """What a node should hold, or why it is not checked."""

    value: np.ndarray | None = None
    weight_type: str | None = None
    weight: str | None = None
    params: list[dict[str, Any]] = field(default_factory=list)
    skip: str | None = None
    note: str = ""
    # other honest ggml paths for the same op (label, value): the closest one is the verdict's
    alternatives: list[tuple[str, np.ndarray]] = field(default_factory=list)


class SkipNode(Exception):
    """The node cannot be recomputed from what the capture holds (the reason is recorded)."""


# --- small helpers -----------------------------------------------------------------------------------
def shape4(ne: Any) -> tuple[int, ...]:
    ne = [int(x) for x in ne] + [1] * (4 - len(ne))
    return tuple(reversed(ne[:4]))


def param_f32(node: Node, k: int) -> float:
    p = node.record.get("op_params") or []
    return float(np.array([p[k] if k < len(p) else 0], dtype=np.int32).view(np.float32)[0])


def param_i32(node: Node, k: int) -> int:
    p = node.record.get("op_params") or []
    return int(p[k]) if k < len(p) else 0


def mismatch(param: str, engine: float, model: float, rel: float = 1e-6) -> list[dict[str, Any]]:
    """One record when the engine's value is not the model's (relative tolerance for float parameters)."""
    if engine == model or abs(engine - model) <= rel * max(abs(model), abs(engine)):
        return []

    def g(v: float) -> float:
        return v if isinstance(v, int) else float(f"{v:.7g}")

    return [{"param": param, "engine": g(engine), "model": g(model)}]


def round_to(x: np.ndarray, type_name: str) -> np.ndarray:
    t = type_name.lower()
    if t == "f16":
        return round_fp16(x)
    if t == "bf16":
        return round_bf16(x)
    if t == "f32":
        return np.asarray(x, dtype=F32)
    raise SkipNode(f"no rounding rule for destination type {type_name}")


def permutation(node: Node) -> list[int]:
    """numpy axis order of ggml_permute(a, axes): result ne[axes[i]] = a.ne[i]."""
    axes = [param_i32(node, k) for k in range(4)]
    perm = [0] * 4
    for i, ax in enumerate(axes):
        perm[3 - ax] = 3 - i
    return perm


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, F32(0))


UNARY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "SILU": ops.silu,
    "RELU": relu,
    "SQR": lambda x: x * x,
    "GELU": ops.gelu,
}
ACTIVATION: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "silu": ops.silu,
    "relu2": lambda x: relu(x) * relu(x),
    "gelu": ops.gelu,
}


# --- the context: lane data, model, positions ----------------------------------------------------------
class Context:
    def __init__(self, cap: Capture, model: KernelModel) -> None:
        self.cap = cap
        self.model = model
        self.by_i = {n.i: n for n in cap.nodes}
        self.n_tokens = cap.n_tokens
        self._data: dict[int, np.ndarray] = {}
        self.act_pos: dict[int, int] = {}
        self.positions = self._positions()

    def data(self, i: int) -> np.ndarray:
        if i not in self._data:
            node = self.by_i[i]
            if node.key is None:
                raise SkipNode(f"source node {i} {node.name!r} has no data in the capture")
            self._data[i] = self.cap.data(node).reshape(shape4(node.ne))
        return self._data[i]

    def drop(self, i: int) -> None:
        self._data.pop(i, None)

    def src(self, node: Node, k: int) -> dict[str, Any] | None:
        srcs = node.record.get("src") or []
        return srcs[k] if k < len(srcs) else None

    def is_weight(self, s: dict[str, Any] | None) -> bool:
        return bool(s) and s.get("node") is None and self.model.has(str(s["name"]))

    def src_data(self, node: Node, k: int) -> np.ndarray:
        s = self.src(node, k)
        if s is None:
            raise SkipNode(f"source {k} missing")
        if s.get("node") is not None:
            return self.data(int(s["node"]))
        if s.get("key"):
            return np.asarray(self.cap.source(s["key"]), dtype=F32).reshape(shape4(s["ne"]))
        if self.is_weight(s):
            return self.model.tensor(str(s["name"])).reshape(shape4(s["ne"]))
        raise SkipNode(f"source {s['name']!r} has no data in the capture and is not a model tensor")

    def _positions(self) -> np.ndarray:
        for node in self.cap.nodes:
            s = self.src(node, 1)
            if node.op == "ROPE" and s and s.get("key"):
                return np.asarray(self.cap.source(s["key"])).reshape(-1).astype(np.int64)
        return np.arange(self.n_tokens, dtype=np.int64)


# --- op handlers ----------------------------------------------------------------------------------------
def op_mul_mat(ctx: Context, node: Node) -> Expect:
    s0 = ctx.src(node, 0)
    if ctx.is_weight(s0):
        return _weight_matmul(ctx, node, str(s0["name"]))
    a, b = ctx.src_data(node, 0), ctx.src_data(node, 1)
    r2, r3 = b.shape[1] // a.shape[1], b.shape[0] // a.shape[0]
    if a.shape[-1] != b.shape[-1] or r2 * a.shape[1] != b.shape[1] or r3 * a.shape[0] != b.shape[0]:
        raise SkipNode(f"operands {list(a.shape)} x {list(b.shape)} do not broadcast as ggml_mul_mat")
    a = np.repeat(np.repeat(a, r2, axis=1), r3, axis=0).astype(np.float64).swapaxes(-1, -2)  # GQA: i02 = i12 / r2
    kv_k = ctx_is_kv(ctx, node, "k")

    def product(bb: np.ndarray) -> np.ndarray:
        y = np.matmul(bb.astype(np.float64), a).astype(F32)
        if kv_k:
            y[..., ctx.n_tokens :] = NAN  # empty KV cells
        return y

    t0 = str(s0.get("type", "f32")).lower()
    if t0 in ("f16", "bf16"):
        # vec_dot converts src1 to src0's type; llamafile's tinyBLAS (F16 x F32 on AVX/F16C) reads it as f32
        return Expect(
            product(round_to(b, t0)),
            weight_type=t0,
            note="activation x activation",
            alternatives=[("tinyBLAS: src1 kept f32", product(b))],
        )
    return Expect(product(b), weight_type=t0, note="activation x activation")


def _weight_matmul(ctx: Context, node: Node, name: str) -> Expect:
    t = ctx.model.info(name)
    rows, cols = t.rows_cols
    x = ctx.src_data(node, 1)
    if x.shape[-1] != cols:
        raise SkipNode(f"activation has {x.shape[-1]} columns, {name} has {cols}")
    x2 = x.reshape(-1, cols)
    y = ggml_linear(x2, ctx.model.raw(name), t.type_name, rows, cols)
    alt = []
    if vec_dot_type(t.type_name) == "Q8_K":
        alt = [
            (
                "Q8_K rounding of the unrounded product (nearest_int contracted to an FMA)",
                _q8_k_fused_linear(x2, ctx.model.raw(name), t.type_name, rows, cols).reshape(x.shape[:-1] + (rows,)),
            )
        ]
    if t.type_name in ("F16", "BF16"):  # tinyBLAS multiplies F16 weights by f32 activations (no rounding)
        alt = [
            (
                "tinyBLAS: activations kept f32",
                exact_linear(x2, ctx.model.raw(name), t.type_name, rows, cols).reshape(x.shape[:-1] + (rows,)),
            )
        ]
    return Expect(y.reshape(x.shape[:-1] + (rows,)), weight_type=t.type_name, weight=name, alternatives=alt)


def _q8_k_fused_linear(
    x: np.ndarray, raw: np.ndarray, type_name: str, rows: int, cols: int, chunk_rows: int = 4096
) -> np.ndarray:
    """W x with Q8_K activations quantized as a build that contracts ``nearest_int(iscale*x)`` (a multiply
    then the 1.5*2^23 rounding add) into one FMA rounds them: the product is not rounded to float32 first
    (GCC's default -ffp-contract=fast with -mfma; measured on the October-2024 tree: a rare code differs)."""
    xb = x.reshape(x.shape[0], -1, 256)
    idx = np.abs(xb).argmax(axis=2)
    vmax = np.take_along_axis(xb, idx[..., None], axis=2)[..., 0]
    zero = vmax == 0
    iscale = np.where(zero, F32(0), F32(-127) / np.where(zero, F32(1), vmax)).astype(F32)
    q = np.minimum(np.rint(xb.astype(np.float64) * iscale[..., None].astype(np.float64)), 127)
    with np.errstate(divide="ignore"):
        d = np.where(zero, F32(0), F32(1) / np.where(zero, F32(1), iscale)).astype(F32)
    a = (q * d[..., None].astype(np.float64)).reshape(x.shape[0], cols)
    rb = row_nbytes(type_name, cols)
    out = np.empty((x.shape[0], rows), dtype=F32)
    for r0 in range(0, rows, chunk_rows):
        n = min(chunk_rows, rows - r0)
        w = dequantize(raw[r0 * rb : (r0 + n) * rb], type_name, n * cols).reshape(n, cols).astype(np.float64)
        out[:, r0 : r0 + n] = a @ w.T
    return out


def ctx_is_kv(ctx: Context, node: Node, kind: str) -> bool:
    """Whether src0 of an attention matmul is read from the K (or V) cache."""
    root = kv_root(ctx, ctx.src(node, 0))
    return root is not None and root[0] == kind


def cache_leaf(s: dict[str, Any] | None) -> tuple[str, int, str] | None:
    """(k|v, layer, type) for a KV-cache leaf source (llama.cpp names them cache_k_l<i> / cache_v_l<i>)."""
    if s is None or s.get("node") is not None:
        return None
    m = _CACHE.match(str(s["name"]))
    return (m.group(1), int(m.group(2)), str(s.get("type", "f32")).lower()) if m else None


def kv_root(ctx: Context, s: dict[str, Any] | None) -> tuple[str, int, str] | None:
    """(k|v, layer, cache type) when a source is a view chain over a KV-cache leaf."""
    while s is not None and s.get("node") is not None:
        n = ctx.by_i[int(s["node"])]
        if n.op not in VIEW_OPS:
            return None
        s = ctx.src(n, 0)
    return cache_leaf(s)


def op_rms_norm(ctx: Context, node: Node) -> Expect:
    x = ctx.src_data(node, 0)
    eps = ctx.model.eps
    y = ops.rms(x.reshape(-1, x.shape[-1]), eps).reshape(x.shape)
    return Expect(y, params=mismatch("eps", param_f32(node, 0), eps))


def _tile(b: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    b = b.reshape((1,) * (4 - b.ndim) + b.shape)
    reps = [s // t for s, t in zip(shape, b.shape, strict=True)]
    if any(r * t != s for r, t, s in zip(reps, b.shape, shape, strict=True)):
        raise SkipNode(f"{list(b.shape)} does not broadcast to {list(shape)}")
    return np.tile(b, reps)


def _binary(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Callable[[Context, Node], Expect]:
    def handler(ctx: Context, node: Node) -> Expect:
        a = ctx.src_data(node, 0)
        b = _tile(ctx.src_data(node, 1), a.shape)
        w = next((str(ctx.src(node, k)["name"]) for k in (0, 1) if ctx.is_weight(ctx.src(node, k))), None)
        return Expect(fn(a, b).astype(F32), weight=w)

    return handler


def op_rope(ctx: Context, node: Node) -> Expect:
    x = ctx.src_data(node, 0)
    pos = np.asarray(ctx.src_data(node, 1)).reshape(-1).astype(np.int64)
    r = ctx.model.rope
    ff = ctx.model.tensor("rope_freqs.weight").reshape(-1) if r.freq_factors else None
    cos, sin = ops.rope_cos_sin(pos, int(r.n_rot), float(r.freq_base), float(r.freq_scale), ff, float(r.attn_factor))
    y = ops.rope(x[0], cos, sin, neox=r.rope_type == "neox")[None]
    params = (
        mismatch("n_dims", param_i32(node, 1), int(r.n_rot))
        + mismatch("mode", param_i32(node, 2), ctx.model.rope_mode)
        + mismatch("freq_base", param_f32(node, 5), float(F32(r.freq_base)))
        + mismatch("freq_scale", param_f32(node, 6), float(F32(r.freq_scale)))
        + mismatch("ext_factor", param_f32(node, 7), 0.0)
    )
    af = param_f32(node, 8)
    if af != 0.0 or param_i32(node, 9) != 0:  # attn_factor is recorded by every generation that sets it
        params += mismatch("attn_factor", af, float(F32(r.attn_factor)))
    return Expect(y, params=params)


def causal_mask(ctx: Context, n_kv: int, n_rows: int) -> np.ndarray:
    """The model's mask: token t sees cell c (holding position c) iff c <= pos[t]; -inf otherwise."""
    pos = ctx.positions[:n_rows]
    cells = np.arange(n_kv)
    m = np.where(cells[None, :] <= pos[:, None], F32(0), F32(-np.inf)).astype(F32)
    m[:, ctx.n_tokens :] = -np.inf
    return m


def op_soft_max(ctx: Context, node: Node) -> Expect:
    x = ctx.src_data(node, 0)
    scale = ctx.model.kq_scale
    n_kv, n_rows = x.shape[-1], x.shape[-2]
    if n_rows > len(ctx.positions):
        raise SkipNode(f"{n_rows} rows but {len(ctx.positions)} positions")
    with np.errstate(invalid="ignore", over="ignore"):
        y = ops.softmax(x * F32(scale) + causal_mask(ctx, n_kv, n_rows))
    y[..., ctx.n_tokens :] = NAN  # padded cells: not compared
    params = mismatch("scale", param_f32(node, 0), scale) + mismatch("max_bias", param_f32(node, 1), 0.0)
    return Expect(y, params=params, note="model causal mask from positions (captured mask not used)")


def op_activation(ctx: Context, node: Node) -> Expect:
    s = ctx.src(node, 0)
    prev = ctx.by_i.get(int(s["node"])) if s and s.get("node") is not None else None
    pos = ctx.act_pos.get(prev.i, -1) + 1 if prev is not None and prev.op in ACT_OPS else 0
    ctx.act_pos[node.i] = pos
    chain = ACTIVATION_CHAIN.get(ctx.model.activation, ())
    want = chain[pos] if pos < len(chain) else None
    if want is None:
        raise SkipNode(f"{node.op} is step {pos + 1} of an activation the model defines as {list(chain)}")
    y = UNARY[want](ctx.src_data(node, 0))
    params = [] if node.op == want else [{"param": "activation", "engine": node.op, "model": want}]
    return Expect(y.astype(F32), params=params)


def op_glu(ctx: Context, node: Node) -> Expect:
    a = ctx.src_data(node, 0)
    if ctx.src(node, 1) is not None:
        b = ctx.src_data(node, 1)
    else:
        h = a.shape[-1] // 2
        a, b = a[..., :h], a[..., h:]
    if param_i32(node, 1):
        a, b = b, a
    act = ctx.model.activation
    y = ACTIVATION[act](a) * b
    want = GLU_OP.get(act)
    engine = param_i32(node, 0)
    params = (
        []
        if want == engine
        else [
            {
                "param": "glu_op",
                "engine": GLU_NAMES.get(engine, engine),
                "model": GLU_NAMES.get(want, f"{act} (no fused GLU)"),
            }
        ]
    )
    return Expect(y.astype(F32), params=params)


def op_get_rows(ctx: Context, node: Node) -> Expect:
    s0 = ctx.src(node, 0)
    ids = np.asarray(ctx.src_data(node, 1)).reshape(-1).astype(np.int64)
    if ctx.is_weight(s0):
        name = str(s0["name"])
        y = ctx.model.rows(name, ids)
        return Expect(y.reshape(shape4(node.ne)), weight_type=ctx.model.info(name).type_name, weight=name)
    x = ctx.src_data(node, 0)
    if x.shape[0] != 1 or x.shape[1] != 1:
        raise SkipNode("GET_ROWS over 3-D sources is not modelled")
    return Expect(x[:, :, ids, :])


def op_copy(ctx: Context, node: Node) -> Expect:
    """CPY/DUP into a destination (the KV cache): the source's logical content, rounded to its type."""
    x = ctx.src_data(node, 0)
    return Expect(round_to(x.reshape(shape4(node.ne)), str(node.record.get("type", "f32"))))


def op_set_rows(ctx: Context, node: Node) -> Expect:
    x = ctx.src_data(node, 0)
    ids = np.asarray(ctx.src_data(node, 1)).reshape(-1).astype(np.int64)
    shape = shape4(node.ne)
    y = np.full((int(np.prod(shape[:-1])), shape[-1]), NAN, dtype=F32)
    y[ids] = round_to(x.reshape(-1, shape[-1]), str(node.record.get("type", "f32")))
    return Expect(y.reshape(shape), note="written rows only")


def op_view_like(ctx: Context, node: Node) -> Expect:
    s = ctx.src(node, 0)
    if s is None or s.get("node") is None:
        raise SkipNode("view of a leaf that attention does not read (a KV-cache destination)")
    x = ctx.src_data(node, 0)
    shape = shape4(node.ne)
    if node.op == "PERMUTE":
        return Expect(np.transpose(x, permutation(node)))
    if node.op == "TRANSPOSE":
        return Expect(x.swapaxes(-1, -2))
    offset = param_i32(node, 0) | (param_i32(node, 1) << 32) if node.op == "VIEW" else 0
    if x.size != int(np.prod(shape)) or offset:
        raise SkipNode(
            f"{node.op} of {x.size} -> {int(np.prod(shape))} elements at offset {offset}: "
            "strides are not in the capture"
        )
    return Expect(x.reshape(shape))


HANDLERS: dict[str, Callable[[Context, Node], Expect]] = {
    "MUL_MAT": op_mul_mat,
    "RMS_NORM": op_rms_norm,
    "ROPE": op_rope,
    "SOFT_MAX": op_soft_max,
    "ADD": _binary(np.add),
    "MUL": _binary(np.multiply),
    "SUB": _binary(np.subtract),
    "GET_ROWS": op_get_rows,
    "CPY": op_copy,
    "DUP": op_copy,
    "SET_ROWS": op_set_rows,
    **dict.fromkeys(VIEW_OPS, op_view_like),
    **dict.fromkeys(ACT_OPS, op_activation),
    **dict.fromkeys(GLU_NAMES.values(), op_glu),
    "GLU": op_glu,
}
