"""Hyper-parameters of a llama-family model, read once from GGUF metadata (llama2.c's `Config`).

`HParams.from_gguf(g, activation)` reads every key the forward graphs use, with llama.cpp's defaults
for the optional ones, and refuses (NotImplementedError / ValueError naming the key or tensor) any
feature the reference does not implement. `to_dict()` is what receipts record as
reference_settings["hparams"].

Keys read (prefix `{arch}.` = general.architecture):
    block_count, embedding_length, feed_forward_length, attention.head_count,
    attention.layer_norm_rms_epsilon                         required
    attention.head_count_kv        default head_count
    attention.key_length           default embedding_length / head_count (value_length must equal it)
    rope.dimension_count           default the head size
    rope.freq_base                 default 10000
    rope.scaling.type              default "linear" (none | linear; YaRN/LongRoPE refused)
    rope.scaling.factor            default rope.scale_linear, default 0 (= no scaling)
    rope.scaling.attn_factor       default 1
    context_length                 default 0 (recorded only)
    attention.scale                llama: recorded as ignored (llama.cpp's llama graph does not read it)
    hidden_activation              bitnet only, see `bitnet_activation`
    expert_count                   llama: > 0 (MoE) refused

BitNet FFN activation (recorded as activation, with activation_source saying why):
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
    bitnet-25 is BitNet.cpp's Eddie-Wang1120 fork name: LLM_ARCH_BITNET_25 shares LLM_ARCH_BITNET_B158's
    hparams loader and graph builder; its keys are {arch}.* like the rest.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from parity_both.gguf.constants import BITNET_ARCHS, unsupported_arch_message
from parity_both.gguf.reader import GGUFFile

F32 = np.float32
ACTIVATION_NAMES = ("silu", "relu2")
DEFAULT_ACTIVATION = {"bitnet": "silu", "bitnet-b1.58": "relu2", "bitnet-25": "relu2"}
# {arch}.hidden_activation values (HF config names and llama.cpp's) -> the activation they mean
_HIDDEN_ACT = {"relu2": "relu2", "relu_sqr": "relu2", "silu": "silu", "swish": "silu", "swiglu": "silu"}
BITNET_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_FAMILY_FIELDS = ("qk_norm", "q_scale", "embd_scale", "attn_softcap", "final_softcap", "swa", "moe")
_BITNET_ABSENT = ("output.weight", "rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def lm_head_tensor(tensor_names: Collection[str]) -> str:
    """The LM head of an architecture that unties it when the file has output.weight (llama, qwen, phi3,
    gemma3): output.weight, else the tied token_embd.weight."""
    return "output.weight" if "output.weight" in tensor_names else "token_embd.weight"


def lm_head_label(tensor_names: Collection[str]) -> str:
    """lm_head_tensor as HParams records it (a tied head marked so)."""
    head = lm_head_tensor(tensor_names)
    return head if head == "output.weight" else f"{head} (tied)"


@dataclass(frozen=True)
class Rope:
    rope_type: str  # "normal" (llama: adjacent pairs) | "neox" (bitnet: i, i + n_rot/2)
    n_rot: int
    freq_base: float
    freq_scale: float
    scaling_type: str
    attn_factor: float
    freq_factors: bool  # rope_freqs.weight present (llama only)


@dataclass(frozen=True)
class Swa:
    """Sliding-window attention: layer il attends to keys with pos_q - pos_k < window when layers[il]."""

    window: int
    layers: tuple[bool, ...]
    pattern_source: str  # where `layers` came from (key value or llama.cpp's default pattern)
    rope: Rope  # the RoPE of the sliding-window layers (rope.freq_base_swa, llama.cpp's swa scale)


@dataclass(frozen=True)
class Moe:
    """llama.cpp's build_moe_ffn for llama-arch experts (Mixtral): softmax over all n_expert router
    logits, the top n_used by probability, their probabilities renormalised to sum 1 (norm_w: sum
    clamped at 6.1e-5), times weights_scale when it is neither 0 nor 1."""

    n_expert: int
    n_used: int
    gating: str  # "softmax"
    norm_w: bool
    weights_scale: float


@dataclass(frozen=True)
class HParams:
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    rms_eps: float
    kq_scale: float
    rope: Rope
    lm_head: str
    activation: str
    activation_source: str | None = None  # bitnet only
    attention_scale_key_ignored: float | None = None  # llama only
    scale_tensors: tuple[str, ...] = ()  # bitnet: matrices with a .scale tensor in some layer
    # the other families (hparams_families.py); the defaults are llama's graph
    qk_norm: bool = False  # qwen3, gemma3: RMSNorm over each Q/K head (attn_q_norm / attn_k_norm)
    q_scale: bool = False  # phi3, gemma: Q scaled by kq_scale before K.Q (softmax scale 1)
    embd_scale: float = 0.0  # gemma: embeddings times sqrt(n_embd) (0 = none)
    attn_softcap: float = 0.0  # gemma2: kq = c * tanh(kq / c) (0 = off)
    final_softcap: float = 0.0  # gemma2, gemma3 if declared: logits = c * tanh(logits / c)
    swa: Swa | None = None  # sliding-window layers
    moe: Moe | None = None  # mixture-of-experts FFN (llama arch with expert_count > 0)

    @property
    def family_keys(self) -> tuple[str, ...]:
        return _FAMILY_FIELDS

    @property
    def is_bitnet(self) -> bool:
        return self.arch in BITNET_ARCHS

    @classmethod
    def from_gguf(cls, g: GGUFFile, activation: str | None = None) -> HParams:
        arch = g.architecture
        if arch == "llama":
            return _llama(g, activation)
        if arch in BITNET_ARCHS:
            return _bitnet(g, activation)
        from parity_both.reference import hparams_families  # noqa: PLC0415 - it imports this module

        reader = hparams_families.READERS.get(arch)
        if reader is None:
            raise NotImplementedError(unsupported_arch_message(arch))
        return reader(g, activation)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable, the keys each architecture has always recorded."""
        d = asdict(self)
        del d["arch"]
        if self.arch not in ("llama", *BITNET_ARCHS) or self.moe is not None:
            d.pop("activation_source"), d.pop("scale_tensors")
            return d
        for k in _FAMILY_FIELDS:  # llama/bitnet receipts keep the keys they always recorded
            del d[k]
        if self.is_bitnet:
            del d["attention_scale_key_ignored"]
            d.update(sub_norms=True, scale_tensors=list(self.scale_tensors))
        else:
            del d["activation_source"], d["scale_tensors"]
        return d


class _Meta:
    """`{arch}.{suffix}` metadata reads; a missing key without default is an error."""

    def __init__(self, g: GGUFFile):
        self.g, self.arch = g, g.architecture

    def __call__(self, suffix: str, default: Any = None) -> Any:
        v = self.g.metadata.get(f"{self.arch}.{suffix}", default)
        if v is None:
            raise ValueError(f"model metadata lacks {self.arch}.{suffix}")
        return v

    def opt(self, suffix: str) -> Any:
        return self.g.metadata.get(f"{self.arch}.{suffix}")


def _common(key: _Meta) -> dict[str, Any]:
    """Sizes shared by the llama-family graphs, checked as llama.cpp checks them."""
    n_embd = int(key("embedding_length"))
    n_head = int(key("attention.head_count"))
    n_head_kv = int(key("attention.head_count_kv", n_head))
    head_dim = int(key("attention.key_length", n_embd // n_head))
    if int(key("attention.value_length", head_dim)) != head_dim:
        raise NotImplementedError("different key and value head sizes are not implemented")
    if n_head % n_head_kv:
        raise ValueError(f"head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
    return {
        "arch": key.arch,
        "n_layer": int(key("block_count")),
        "n_embd": n_embd,
        "n_head": n_head,
        "n_head_kv": n_head_kv,
        "head_dim": head_dim,
        "n_ff": int(key("feed_forward_length")),
        "n_vocab": key.g.tensors["token_embd.weight"].rows_cols[0],
        "n_ctx_train": int(key("context_length", 0)),
        "rms_eps": float(key("attention.layer_norm_rms_epsilon")),
        "kq_scale": float(F32(1.0) / np.sqrt(F32(head_dim))),
    }


def _rope(key: _Meta, rope_type: str, n_rot: int, freq_factors: bool) -> Rope:
    """RoPE as llama.cpp sets it up (llama-model.cpp / llama-context.cpp): base and linear scaling."""
    scaling = str(key("rope.scaling.type", "linear"))
    factor = float(key("rope.scaling.factor", key("rope.scale_linear", 0.0)) or 0.0)
    if scaling not in ("none", "linear"):
        raise NotImplementedError(
            f"{key.arch}.rope.scaling.type={scaling!r} (YaRN/LongRoPE) is not implemented "
            "by the reference; use a model without RoPE scaling"
        )
    freq_scale = 1.0 if scaling == "none" or factor == 0.0 else 1.0 / factor
    return Rope(
        rope_type,
        n_rot,
        float(key("rope.freq_base", 10000.0)),
        float(F32(freq_scale)),
        scaling,
        float(key("rope.scaling.attn_factor", 1.0)),
        freq_factors,
    )


def _llama(g: GGUFFile, activation: str | None) -> HParams:
    if activation not in (None, "silu"):
        raise ValueError(f"the llama architecture uses SiLU; activation={activation!r} is not meaningful")
    key = _Meta(g)
    c = _common(key)
    n_rot = int(key("rope.dimension_count", c["head_dim"]))
    if n_rot != c["head_dim"]:  # llama.cpp asserts the same
        raise ValueError(f"llama needs rope.dimension_count == head size ({n_rot} != {c['head_dim']})")
    if g.tensors.keys() & {"rope_factors_long.weight", "rope_factors_short.weight"}:
        raise NotImplementedError("LongRoPE factor tensors are not implemented by the reference")
    # llama.cpp's llama architecture does not read {arch}.attention.scale (only granite & co do):
    # the scale is always 1/sqrt(head_dim) there, so it is here; a present key is recorded as ignored.
    ignored = key.opt("attention.scale")
    from parity_both.reference.hparams_families import moe_params  # noqa: PLC0415 - it imports this module

    return HParams(
        **c,
        moe=moe_params(key),
        rope=_rope(key, "normal", n_rot, "rope_freqs.weight" in g.tensors),
        lm_head=lm_head_label(g.tensors),
        activation="silu",
        attention_scale_key_ignored=None if ignored is None else float(ignored),
    )


def bitnet_activation(g: GGUFFile, requested: str | None) -> tuple[str, str]:
    """The BitNet FFN activation and where the choice came from (see the module docstring)."""
    arch = g.architecture
    if requested is not None:
        if requested not in ACTIVATION_NAMES:
            raise ValueError(f"activation {requested!r} is not one of {sorted(ACTIVATION_NAMES)}")
        return requested, "caller"
    declared = g.metadata.get(f"{arch}.hidden_activation")
    if declared is not None:
        if str(declared) not in _HIDDEN_ACT:
            raise NotImplementedError(
                f"{arch}.hidden_activation={declared!r} is not implemented "
                f"(known: {sorted(_HIDDEN_ACT)}); pass activation= explicitly"
            )
        return _HIDDEN_ACT[str(declared)], f"metadata {arch}.hidden_activation={declared!r}"
    return DEFAULT_ACTIVATION[arch], f"architecture default for {arch!r}"


def _bitnet(g: GGUFFile, activation: str | None) -> HParams:
    key = _Meta(g)
    c = _common(key)  # bitnet, like llama, asserts equal key and value head sizes
    if c["n_head"] * c["head_dim"] != c["n_embd"]:  # mainline creates wq and wo as n_embd x n_embd
        raise ValueError(
            f"bitnet needs head_count * head size == embedding_length "
            f"({c['n_head']} * {c['head_dim']} != {c['n_embd']})"
        )
    n_rot = int(key("rope.dimension_count", c["head_dim"]))
    if n_rot > c["head_dim"] or n_rot % 2:
        raise ValueError(f"{key.arch}.rope.dimension_count={n_rot} does not fit head size {c['head_dim']}")
    for name in _BITNET_ABSENT:
        if name in g.tensors:
            raise NotImplementedError(
                f"tensor {name!r}: llama.cpp's bitnet graph has no such tensor "
                "(the LM head is token_embd, RoPE has no frequency factors)"
            )
    biases = sorted(n for n in g.tensors if n.startswith("blk.") and n.endswith(".bias"))
    if biases:
        raise NotImplementedError(f"tensor {biases[0]!r}: llama.cpp's bitnet graph has no biases")
    act, source = bitnet_activation(g, activation)
    scales = sorted({n.split(".")[2] for n in g.tensors if n.startswith("blk.") and n.endswith(".scale")})
    unknown = set(scales) - set(BITNET_MATRICES)
    if unknown:
        raise NotImplementedError(f"scale tensors for {sorted(unknown)} are not part of the bitnet graph")
    return HParams(
        **c,
        rope=_rope(key, "neox", n_rot, False),
        lm_head="token_embd.weight (always, bitnet)",
        activation=act,
        activation_source=source,
        scale_tensors=tuple(scales),
    )
