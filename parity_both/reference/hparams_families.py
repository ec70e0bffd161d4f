"""Hyper-parameters of the families beyond llama/bitnet, read from GGUF metadata as llama.cpp reads them
(llama-cpp-python 0.3.36: src/models/{qwen2,qwen3,phi3,gemma2,gemma3,llama}.cpp load_arch_hparams,
llama-model.cpp's common loader, llama-hparams.cpp set_swa_pattern).

Keys read (prefix `{arch}.`), beyond the common ones of hparams.py (block_count, embedding_length,
feed_forward_length, attention.head_count[_kv], attention.key_length/value_length,
attention.layer_norm_rms_epsilon, context_length, rope.dimension_count, rope.freq_base, rope.scaling.*):

    qwen2, qwen3   nothing more (qwen2: optional Q/K/V biases, optional output.bias; qwen3: Q/K norms)
    phi3           attention.sliding_window: read and IGNORED, as llama.cpp does ("Phi SWA is currently
                   disabled", it sets swa_type NONE); LongRoPE factor tensors refused
    gemma2         attention.sliding_window (default 4096), attention.sliding_window_pattern (default 2:
                   every other layer, starting with layer 0, is a sliding-window layer; an array gives
                   the per-layer flags), rope.freq_base_swa (default rope.freq_base; the swa layers use
                   the trained rope scale too), attn_logit_softcapping (default 50),
                   final_logit_softcapping (default 30)
    gemma3         attention.sliding_window (absent or 0: no sliding-window layers),
                   attention.sliding_window_pattern (default 6: five local layers then one global),
                   rope.freq_base_swa (default 10000; the swa layers' rope scale is 1, the global
                   layers' the trained one), final_logit_softcapping (default 0 = off); no attention
                   soft-capping
    gemma2/gemma3  Q scale 1/sqrt(head size), or 1/sqrt(n_embd / n_head) for the 27B sizes
                   (46 / 62 layers, llama.cpp's LLM_TYPE_27B); embeddings times sqrt(n_embd)
    llama + MoE    expert_count, expert_used_count (one value for every layer); llama's graph gates
                   with softmax and renormalises the selected weights; it reads no
                   expert_weights_scale / expert_gating_func (recorded as not applied)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from parity_both.gguf.reader import GGUFFile
from parity_both.reference.hparams import F32, HParams, Moe, Rope, Swa, _common, _Meta, _rope, lm_head_label

_LONGROPE = ("rope_factors_long.weight", "rope_factors_short.weight")


def _activation(arch: str, requested: str | None, native: str) -> str:
    if requested not in (None, native):
        raise ValueError(f"the {arch} architecture uses {native}; activation={requested!r} is not meaningful")
    return native


def _rope_neox(key: _Meta, c: dict[str, Any], *, full: bool = True) -> Rope:
    n_rot = int(key("rope.dimension_count", c["head_dim"]))
    if full and n_rot != c["head_dim"]:  # llama.cpp asserts the same
        raise ValueError(f"{key.arch} needs rope.dimension_count == head size ({n_rot} != {c['head_dim']})")
    if n_rot > c["head_dim"] or n_rot % 2:
        raise ValueError(f"{key.arch}.rope.dimension_count={n_rot} does not fit head size {c['head_dim']}")
    if key.g.tensors.keys() & set(_LONGROPE):
        raise NotImplementedError(
            "LongRoPE factor tensors (rope_factors_long/short) are not implemented by the reference"
        )
    return _rope(key, "neox", n_rot, "rope_freqs.weight" in key.g.tensors)


def _qwen2(g: GGUFFile, activation: str | None) -> HParams:
    key = _Meta(g)
    c = _common(key)
    return HParams(
        **c,
        rope=_rope_neox(key, c),
        lm_head=lm_head_label(g.tensors),
        activation=_activation("qwen2", activation, "silu"),
    )


def _qwen3(g: GGUFFile, activation: str | None) -> HParams:
    key = _Meta(g)
    c = _common(key)
    return HParams(
        **c,
        rope=_rope_neox(key, c),
        lm_head=lm_head_label(g.tensors),
        activation=_activation("qwen3", activation, "silu"),
        qk_norm=True,
    )


def _phi3(g: GGUFFile, activation: str | None) -> HParams:
    key = _Meta(g)
    c = _common(key)
    # attention.sliding_window is ignored like llama.cpp ignores it (to_dict records the fact)
    return HParams(
        **c,
        rope=_rope_neox(key, c, full=False),
        lm_head=lm_head_label(g.tensors),
        activation=_activation("phi3", activation, "silu"),
        q_scale=True,
    )


def swa_layers(key: _Meta, n_layer: int, default_pattern: int) -> tuple[tuple[bool, ...], str]:
    """llama.cpp's load_swa_pattern: an array of per-layer flags, else a period n (default
    `default_pattern`): layer il slides when n == 0 or il % n < n - 1."""
    v = key.opt("attention.sliding_window_pattern")
    if isinstance(v, list):
        if len(v) < n_layer:
            raise ValueError(f"{key.arch}.attention.sliding_window_pattern has {len(v)} flags for {n_layer} layers")
        return tuple(bool(x) for x in v[:n_layer]), f"{key.arch}.attention.sliding_window_pattern (array)"
    n = int(v) if v is not None else default_pattern
    src = f"{key.arch}.attention.sliding_window_pattern={n}" if v is not None else f"llama.cpp default pattern {n}"
    return tuple(n == 0 or il % n < n - 1 for il in range(n_layer)), src


def _gemma_common(key: _Meta, c: dict[str, Any]) -> dict[str, Any]:
    big = c["n_layer"] == (46 if key.arch == "gemma2" else 62)  # llama.cpp's LLM_TYPE_27B
    q_scale = c["n_embd"] // c["n_head"] if big else c["head_dim"]
    return {
        "kq_scale": float(F32(1.0) / np.sqrt(F32(q_scale))),
        "q_scale": True,
        "embd_scale": float(np.sqrt(F32(c["n_embd"]), dtype=F32)),
    }


def _gemma2(g: GGUFFile, activation: str | None) -> HParams:
    key = _Meta(g)
    c = _common(key)
    rope = _rope_neox(key, c, full=False)
    layers, src = swa_layers(key, c["n_layer"], 2)
    swa = Swa(
        int(key("attention.sliding_window", 4096)),
        layers,
        src,
        replace(rope, freq_base=float(key("rope.freq_base_swa", rope.freq_base))),
    )
    c.update(_gemma_common(key, c))
    return HParams(
        **c,
        rope=rope,
        lm_head="token_embd.weight (always, gemma2)",
        activation=_activation("gemma2", activation, "gelu"),
        swa=swa,
        attn_softcap=float(key("attn_logit_softcapping", 50.0)),
        final_softcap=float(key("final_logit_softcapping", 30.0)),
    )


def _gemma3(g: GGUFFile, activation: str | None) -> HParams:
    key = _Meta(g)
    c = _common(key)
    rope = _rope_neox(key, c, full=False)
    window = int(key("attention.sliding_window", 0))
    swa = None
    if window > 0:
        layers, src = swa_layers(key, c["n_layer"], 6)
        swa = Swa(
            window, layers, src, replace(rope, freq_base=float(key("rope.freq_base_swa", 10000.0)), freq_scale=1.0)
        )
    c.update(_gemma_common(key, c))
    return HParams(
        **c,
        rope=rope,
        lm_head=lm_head_label(g.tensors),
        activation=_activation("gemma3", activation, "gelu"),
        qk_norm=True,
        swa=swa,
        final_softcap=float(key("final_logit_softcapping", 0.0)),
    )


def moe_params(key: _Meta) -> Moe | None:
    """The llama architecture's experts (None for a dense model)."""
    n_expert = int(key.opt("expert_count") or 0)
    if n_expert == 0:
        return None
    used = key("expert_used_count")
    if isinstance(used, list):
        if len(set(used)) != 1:
            raise NotImplementedError(f"{key.arch}.expert_used_count differs between layers: not implemented")
        used = used[0]
    if not 0 < int(used) <= n_expert:
        raise ValueError(f"{key.arch}.expert_used_count={used} is not in 1..{n_expert}")
    return Moe(n_expert, int(used), "softmax", True, 0.0)


READERS: dict[str, Callable[[GGUFFile, str | None], HParams]] = {
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "phi3": _phi3,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
}
