"""The llama forward graph (mainline llama.cpp src/models/llama.cpp), in plain NumPy.

    x = token_embd[ids]
    for each layer:
        h = rms_norm(x) * attn_norm
        q, k, v = Wq h (+bq), Wk h (+bk), Wv h (+bv)        -> heads of head_dim
        q, k = rope(q), rope(k)                              "normal": adjacent pairs (2i, 2i+1)
        a = softmax(q k^T / sqrt(hd) + causal mask) v        GQA: q head h reads kv head h // (H/Hkv)
        x = x + Wo a (+bo)
        h = rms_norm(x) * ffn_norm
        x = x + Wd (silu(Wg h (+bg)) * (Wu h (+bu))) (+bd)
    logits = W_out (rms_norm(x) * output_norm)               W_out = output.weight or token_embd

Every architecture module exposes the same three things (see engine.ARCHITECTURES):
    ARCHITECTURES   general.architecture values it computes
    hparams(g, activation) -> dict   validated hyper-parameters (JSON-serializable, goes into settings);
                                     refuses, with a clear message, any feature it does not implement
    forward(model, ids, cache, mode) -> float32 logits [len(ids), n_vocab]   for positions
                                     cache.n .. cache.n + len(ids) - 1, appending their K/V to the cache
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from parity_both.gguf.reader import GGUFFile
from parity_both.reference import ops
from parity_both.reference.engine import KVCache, LoadedModel
from parity_both.reference.ops import F32

ARCHITECTURES = ("llama",)
ROPE_TYPE = "normal"


def _rope_hparams(g: GGUFFile, arch: str, n_rot: int) -> dict[str, Any]:
    """RoPE settings as llama.cpp derives them (llama-model.cpp / llama-context.cpp); refuse the rest."""
    def key(suffix: str, default: Any = None) -> Any:
        return g.metadata.get(f"{arch}.{suffix}", default)

    scaling = str(key("rope.scaling.type", "linear"))
    factor = float(key("rope.scaling.factor", key("rope.scale_linear", 0.0)) or 0.0)
    if scaling not in ("none", "linear"):
        raise NotImplementedError(
            f"{arch}.rope.scaling.type={scaling!r} (YaRN/LongRoPE) is not implemented by the reference; "
            "use a model without RoPE scaling")
    if g.tensors.keys() & {"rope_factors_long.weight", "rope_factors_short.weight"}:
        raise NotImplementedError("LongRoPE factor tensors are not implemented by the reference")
    freq_scale = 1.0 if scaling == "none" or factor == 0.0 else 1.0 / factor
    return {
        "rope_type": ROPE_TYPE,
        "n_rot": n_rot,
        "freq_base": float(key("rope.freq_base", 10000.0)),
        "freq_scale": float(F32(freq_scale)),
        "scaling_type": scaling,
        "attn_factor": float(key("rope.scaling.attn_factor", 1.0)),
        "freq_factors": "rope_freqs.weight" in g.tensors,
    }



def metadata_key(g: GGUFFile) -> Callable[..., Any]:
    """key(suffix, default) reads `{arch}.{suffix}`; a missing key without default is an error."""
    arch = g.architecture

    def key(suffix: str, default: Any = None) -> Any:
        v = g.metadata.get(f"{arch}.{suffix}", default)
        if v is None:
            raise ValueError(f"model metadata lacks {arch}.{suffix}")
        return v

    return key


def attention_dims(key: Callable[..., Any]) -> dict[str, int]:
    """Head counts and head size (shared by the llama-family graphs), checked as llama.cpp checks them."""
    n_embd = int(key("embedding_length"))
    n_head = int(key("attention.head_count"))
    n_head_kv = int(key("attention.head_count_kv", n_head))
    head_dim = int(key("attention.key_length", n_embd // n_head))
    if int(key("attention.value_length", head_dim)) != head_dim:
        raise NotImplementedError("different key and value head sizes are not implemented")
    if n_head % n_head_kv:
        raise ValueError(f"head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
    return {"n_embd": n_embd, "n_head": n_head, "n_head_kv": n_head_kv, "head_dim": head_dim}


def common_hparams(key: Callable[..., Any], dims: dict[str, int], emb: Any) -> dict[str, Any]:
    """The hyper-parameters every llama-family graph records (the KV cache is sized from them)."""
    return {
        "n_layer": int(key("block_count")),
        **dims,
        "n_ff": int(key("feed_forward_length")),
        "n_vocab": emb.rows_cols[0],
        "n_ctx_train": int(key("context_length", 0)),
        "rms_eps": float(key("attention.layer_norm_rms_epsilon")),
        "kq_scale": float(F32(1.0) / np.sqrt(F32(dims["head_dim"]))),
    }


def hparams(g: GGUFFile, activation: str | None = None) -> dict[str, Any]:
    arch = g.architecture
    if activation not in (None, "silu"):
        raise ValueError(f"the llama architecture uses SiLU; activation={activation!r} is not meaningful")

    key = metadata_key(g)
    if int(g.metadata.get(f"{arch}.expert_count", 0) or 0) > 0:
        raise NotImplementedError("mixture-of-experts llama models are not implemented by the reference")
    dims = attention_dims(key)
    head_dim = dims["head_dim"]
    n_rot = int(key("rope.dimension_count", head_dim))
    if n_rot != head_dim:  # llama.cpp asserts the same
        raise ValueError(f"llama needs rope.dimension_count == head size ({n_rot} != {head_dim})")
    # llama.cpp's llama architecture does not read {arch}.attention.scale (only granite & co do):
    # the scale is always 1/sqrt(head_dim) there, so it is here; a present key is recorded as ignored.
    ignored_scale = g.metadata.get(f"{arch}.attention.scale")
    emb = g.tensors["token_embd.weight"]
    return {
        **common_hparams(key, dims, emb),
        "attention_scale_key_ignored": None if ignored_scale is None else float(ignored_scale),
        "rope": _rope_hparams(g, arch, n_rot),
        "lm_head": "output.weight" if "output.weight" in g.tensors else "token_embd.weight (tied)",
        "activation": "silu",
    }


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_past: int, kq_scale: float) -> np.ndarray:
    """Causal GQA attention. q [T, H, hd] at positions n_past.., k/v [S, Hkv, hd] (S = n_past + T).
    Returns [T, H * hd]."""
    T, H, hd = q.shape
    S, Hkv, _ = k.shape
    g = H // Hkv
    qh = q.transpose(1, 0, 2).reshape(Hkv, g * T, hd)  # query head h -> kv head h // g
    scores = (qh @ k.transpose(1, 2, 0)).reshape(H, T, S) * F32(kq_scale)
    if T > 1:  # causal mask: query t (position n_past + t) sees keys 0 .. n_past + t
        mask = np.arange(S)[None, :] > (n_past + np.arange(T))[:, None]
        scores[:, mask] = -np.inf
    p = ops.softmax(scores).reshape(Hkv, g * T, S)
    out = (p @ v.transpose(1, 0, 2)).reshape(H, T, hd)
    return out.transpose(1, 0, 2).reshape(T, H * hd)


def _lin(model: LoadedModel, name: str, x: np.ndarray, mode: str) -> np.ndarray:
    """Wx, plus the bias tensor if the model has one."""
    y = ops.linear(x, model.store.matrix(name + ".weight"), mode)
    if model.store.has(name + ".bias"):
        y = y + model.store.vector(name + ".bias")
    return y


def _qkv(model: LoadedModel, p: str, h: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q, K, V projections: separate attn_q/k/v, or one fused attn_qkv split as [q | k | v]."""
    w = model.store
    if not w.has(p + "attn_qkv.weight"):
        return _lin(model, p + "attn_q", h, mode), _lin(model, p + "attn_k", h, mode), \
            _lin(model, p + "attn_v", h, mode)
    nq = model.hp["n_head"] * model.hp["head_dim"]
    nk = model.hp["n_head_kv"] * model.hp["head_dim"]
    y = _lin(model, p + "attn_qkv", h, mode)
    q, k, v = y[:, :nq], y[:, nq:nq + nk], y[:, nq + nk:]
    if not w.has(p + "attn_qkv.bias"):  # fused weight with separate biases (legacy GGUFs)
        q, k, v = (t + w.vector(p + f"attn_{n}.bias") if w.has(p + f"attn_{n}.bias") else t
                   for t, n in ((q, "q"), (k, "k"), (v, "v")))
    return q, k, v


def forward(model: LoadedModel, ids: np.ndarray, cache: KVCache, mode: str) -> np.ndarray:
    """Logits [len(ids), n_vocab] for ids at positions cache.n ..; their K/V are added to the cache."""
    hp, w = model.hp, model.store
    rp = hp["rope"]
    T, n_past = len(ids), cache.n
    H, Hkv, hd = hp["n_head"], hp["n_head_kv"], hp["head_dim"]
    pos = np.arange(n_past, n_past + T)
    factors = w.vector("rope_freqs.weight") if rp["freq_factors"] else None
    cos, sin = ops.rope_cos_sin(pos, rp["n_rot"], rp["freq_base"], rp["freq_scale"], factors,
                                rp["attn_factor"])

    x = w.rows_of("token_embd.weight", ids)
    w.release("token_embd.weight")
    for il in range(hp["n_layer"]):
        p = f"blk.{il}."
        h = ops.rms_norm(x, w.vector(p + "attn_norm.weight"), hp["rms_eps"])
        q, k, v = _qkv(model, p, h, mode)
        q, k, v = q.reshape(T, H, hd), k.reshape(T, Hkv, hd), v.reshape(T, Hkv, hd)
        q = ops.rope(q, cos, sin, neox=False)
        k = ops.rope(k, cos, sin, neox=False)
        ks, vs = cache.append(il, k, v)
        a = attention(q, ks, vs, n_past, hp["kq_scale"])
        x = x + _lin(model, p + "attn_output", a, mode)

        h = ops.rms_norm(x, w.vector(p + "ffn_norm.weight"), hp["rms_eps"])
        gate = _lin(model, p + "ffn_gate", h, mode)
        up = _lin(model, p + "ffn_up", h, mode)
        x = x + _lin(model, p + "ffn_down", ops.silu(gate) * up, mode)
    cache.advance(T)

    x = ops.rms_norm(x, w.vector("output_norm.weight"), hp["rms_eps"])
    head = w.matrix("output.weight" if w.has("output.weight") else "token_embd.weight")
    return ops.linear(x, head, mode, chunk_rows=model.lm_head_chunk_rows(head))
