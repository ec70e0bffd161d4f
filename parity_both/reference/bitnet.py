"""The BitNet b1.58 forward graph (mainline llama.cpp src/models/bitnet.cpp), in plain NumPy.

    x = token_embd[ids]
    for each layer:
        h = rms_norm(x) * attn_norm
        q, k, v = (Wq h) sq, (Wk h) sk, (Wv h) sv             s* = optional per-matrix scale tensors
        q, k = rope(q), rope(k)                                 NEOX: pairs (i, i + n_rot/2)
        a = softmax(q k^T / sqrt(hd) + causal mask) v           GQA as in llama
        x = x + (Wo (rms_norm(a) * attn_sub_norm)) so           sub-norm BEFORE the output projection
        h = rms_norm(x) * ffn_norm
        f = act((Wg h) sg) * ((Wu h) su)                        act = silu | relu2 (see below)
        x = x + (Wd (rms_norm(f) * ffn_sub_norm)) sd            sub-norm BEFORE the down projection
    logits = token_embd (rms_norm(x) * output_norm)             the LM head is always token_embd

One epsilon ({arch}.attention.layer_norm_rms_epsilon) for every norm; no biases, no output.weight,
no rope_freqs (mainline creates none of them for this architecture, so a file that has them does
not load there and is refused here too). The scale tensors ``blk.N.<matrix>.scale`` ({1}, F32) are
optional; where mainline applies them: build_lora_mm multiplies the matmul result (Q, K, V, O and
down), build_ffn multiplies the up and gate results BEFORE the activation (and after a bias, which
bitnet has none of). The October-2024 tree (build_bitnet) applies them at the same places.

Architecture names (general.architecture; the metadata key prefix is the same string):
    bitnet        mainline llama.cpp (and the transcoder's output, parity_both.gguf.transcode)
    bitnet-b1.58  BitNet.cpp's fork and Microsoft's published GGUF of BitNet-b1.58-2B-4T
    bitnet-25     BitNet.cpp's Eddie-Wang1120 fork: LLM_ARCH_BITNET_25 shares LLM_ARCH_BITNET_B158's
                  hparams loader and graph builder (build_bitnet_158), keys are {arch}.* like the rest;
                  Microsoft's convert-ms-to-gguf-bitnet.py writes it. Based on the fork's llama-arch.cpp
                  name table and its llm_load_hparams/llama_build_graph `case` lists (public copies of
                  that source; the fork is not vendored here).

FFN activation (recorded as hparams["activation"], with hparams["activation_source"] saying why):
    1. the caller's ``activation`` argument ("silu" | "relu2"), if given;
    2. else the file's ``{arch}.hidden_activation`` key, if present ("relu2"; "silu"/"swish"/"swiglu");
       mainline's bitnet graph ignores that key, so a file declaring relu2 is a finding, not a bug here;
    3. else the default of the architecture name:
       bitnet        -> silu   what mainline llama.cpp (LLM_FFN_SILU, hard-coded) and BitNet.cpp's current
                               pin (isHuangXin/llama.cpp@390c3077, src/models/bitnet.cpp) compute, so a
                               model carrying the mainline name is checked against its engines' graph;
       bitnet-b1.58  -> relu2  what Microsoft's 2B-4T model was trained with (config.json hidden_act
       bitnet-25     -> relu2  "relu2"); engines running it with SiLU then disagree with the reference,
                               and the receipt shows it (BitNet issues 588, 602: perplexity 99.8 vs 17.1).
       (The older Eddie-Wang1120 fork's build_bitnet_158 used LLM_FFN_RELU_SQR for these two names.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from parity_both.gguf.constants import BITNET_ARCHS
from parity_both.gguf.reader import GGUFFile
from parity_both.reference import ops
from parity_both.reference.engine import KVCache, LoadedModel
from parity_both.reference.llama import attention, attention_dims, common_hparams, metadata_key
from parity_both.reference.ops import F32

ARCHITECTURES = BITNET_ARCHS
ROPE_TYPE = "neox"
DEFAULT_ACTIVATION = {"bitnet": "silu", "bitnet-b1.58": "relu2", "bitnet-25": "relu2"}
# {arch}.hidden_activation values (HF config names and llama.cpp's) -> the activation they mean
_HIDDEN_ACT = {"relu2": "relu2", "relu_sqr": "relu2", "silu": "silu", "swish": "silu", "swiglu": "silu"}
_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_FEATURES_ABSENT = ("output.weight", "rope_freqs.weight", "rope_factors_long.weight",
                    "rope_factors_short.weight")


def _activation(g: GGUFFile, arch: str, requested: str | None) -> tuple[str, str]:
    """The FFN activation and where the choice came from (see the module docstring)."""
    if requested is not None:
        if requested not in ops.ACTIVATIONS:
            raise ValueError(f"activation {requested!r} is not one of {sorted(ops.ACTIVATIONS)}")
        return requested, "caller"
    declared = g.metadata.get(f"{arch}.hidden_activation")
    if declared is not None:
        if str(declared) not in _HIDDEN_ACT:
            raise NotImplementedError(f"{arch}.hidden_activation={declared!r} is not implemented "
                                      f"(known: {sorted(_HIDDEN_ACT)}); pass activation= explicitly")
        return _HIDDEN_ACT[str(declared)], f"metadata {arch}.hidden_activation={declared!r}"
    return DEFAULT_ACTIVATION[arch], f"architecture default for {arch!r}"


def _rope_hparams(g: GGUFFile, arch: str, n_rot: int) -> dict[str, Any]:
    """NEOX RoPE as llama.cpp sets it up for bitnet: base and linear scaling only (no freq factors)."""
    meta = g.metadata
    scaling = str(meta.get(f"{arch}.rope.scaling.type", "linear"))
    factor = float(meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear", 0.0)) or 0.0)
    if scaling not in ("none", "linear"):
        raise NotImplementedError(f"{arch}.rope.scaling.type={scaling!r} (YaRN/LongRoPE) is not implemented "
                                  "by the reference; use a model without RoPE scaling")
    return {
        "rope_type": ROPE_TYPE,
        "n_rot": n_rot,
        "freq_base": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "freq_scale": float(F32(1.0 if scaling == "none" or factor == 0.0 else 1.0 / factor)),
        "scaling_type": scaling,
        "attn_factor": float(meta.get(f"{arch}.rope.scaling.attn_factor", 1.0)),
        "freq_factors": False,
    }


def hparams(g: GGUFFile, activation: str | None = None) -> dict[str, Any]:
    arch = g.architecture
    if arch not in ARCHITECTURES:
        raise ValueError(f"general.architecture={arch!r} is not a BitNet architecture ({ARCHITECTURES})")

    key = metadata_key(g)
    dims = attention_dims(key)  # bitnet, like llama, asserts equal key and value head sizes
    n_embd, n_head, head_dim = dims["n_embd"], dims["n_head"], dims["head_dim"]
    if n_head * head_dim != n_embd:  # mainline creates wq and wo as n_embd x n_embd
        raise ValueError(f"bitnet needs head_count * head size == embedding_length "
                         f"({n_head} * {head_dim} != {n_embd})")
    n_rot = int(key("rope.dimension_count", head_dim))
    if n_rot > head_dim or n_rot % 2:
        raise ValueError(f"{arch}.rope.dimension_count={n_rot} does not fit head size {head_dim}")
    for name in _FEATURES_ABSENT:
        if name in g.tensors:
            raise NotImplementedError(f"tensor {name!r}: llama.cpp's bitnet graph has no such tensor "
                                      "(the LM head is token_embd, RoPE has no frequency factors)")
    biases = sorted(n for n in g.tensors if n.startswith("blk.") and n.endswith(".bias"))
    if biases:
        raise NotImplementedError(f"tensor {biases[0]!r}: llama.cpp's bitnet graph has no biases")
    act, source = _activation(g, arch, activation)
    scales = sorted({n.split(".")[2] for n in g.tensors if n.startswith("blk.") and n.endswith(".scale")})
    unknown = set(scales) - set(_MATRICES)
    if unknown:
        raise NotImplementedError(f"scale tensors for {sorted(unknown)} are not part of the bitnet graph")
    emb = g.tensors["token_embd.weight"]
    return {
        **common_hparams(key, dims, emb),
        "rope": _rope_hparams(g, arch, n_rot),
        "lm_head": "token_embd.weight (always, bitnet)",
        "sub_norms": True,
        "scale_tensors": scales,  # matrices with a .scale tensor in at least one layer
        "activation": act,
        "activation_source": source,
    }


def _lin(model: LoadedModel, name: str, x: np.ndarray, mode: str) -> np.ndarray:
    """(W x) * s: the matmul, then the optional per-matrix scale tensor (ggml_mul by a {1} tensor)."""
    y = ops.linear(x, model.store.matrix(name + ".weight"), mode)
    if model.store.has(name + ".scale"):
        y = y * model.store.vector(name + ".scale")
    return y


def forward(model: LoadedModel, ids: np.ndarray, cache: KVCache, mode: str) -> np.ndarray:
    """Logits [len(ids), n_vocab] for ids at positions cache.n ..; their K/V are added to the cache."""
    hp, w = model.hp, model.store
    rp, eps = hp["rope"], hp["rms_eps"]
    act = ops.ACTIVATIONS[hp["activation"]]
    T, n_past = len(ids), cache.n
    H, Hkv, hd = hp["n_head"], hp["n_head_kv"], hp["head_dim"]
    cos, sin = ops.rope_cos_sin(np.arange(n_past, n_past + T), rp["n_rot"], rp["freq_base"], rp["freq_scale"],
                                None, rp["attn_factor"])

    x = w.rows_of("token_embd.weight", ids)
    w.release("token_embd.weight")
    for il in range(hp["n_layer"]):
        p = f"blk.{il}."
        h = ops.rms_norm(x, w.vector(p + "attn_norm.weight"), eps)
        q = _lin(model, p + "attn_q", h, mode).reshape(T, H, hd)
        k = _lin(model, p + "attn_k", h, mode).reshape(T, Hkv, hd)
        v = _lin(model, p + "attn_v", h, mode).reshape(T, Hkv, hd)
        q = ops.rope(q, cos, sin, neox=True)
        k = ops.rope(k, cos, sin, neox=True)
        ks, vs = cache.append(il, k, v)
        a = attention(q, ks, vs, n_past, hp["kq_scale"])
        a = ops.rms_norm(a, w.vector(p + "attn_sub_norm.weight"), eps)
        x = x + _lin(model, p + "attn_output", a, mode)

        h = ops.rms_norm(x, w.vector(p + "ffn_norm.weight"), eps)
        up = _lin(model, p + "ffn_up", h, mode)
        gate = _lin(model, p + "ffn_gate", h, mode)  # its scale applies BEFORE the activation
        f = ops.rms_norm(act(gate) * up, w.vector(p + "ffn_sub_norm.weight"), eps)
        x = x + _lin(model, p + "ffn_down", f, mode)
    cache.advance(T)

    x = ops.rms_norm(x, w.vector("output_norm.weight"), eps)
    head = w.matrix("token_embd.weight")
    return ops.linear(x, head, mode, chunk_rows=model.lm_head_chunk_rows(head))
