"""BitNet.cpp-format GGUF -> a GGUF mainline llama.cpp loads.

Mainline llama.cpp refuses BitNet.cpp's I2_S tensors (type 36 is retired there) and does not know
the fork's architecture name ``bitnet-b1.58``. This tool
  * rewrites every I2_S tensor as TQ2_0: the ternary codes move over bit for bit (quants.i2s_to_tq2_0);
    only the scale changes, from one float32 per tensor to an fp16 per 256 elements - the relative
    change of each scale is recorded and the maximum reported;
  * renames the fork's architecture (general.architecture and every ``<fork arch>.*`` key) to
    mainline's ``bitnet``, and sets general.file_type 40 (fork: MOSTLY_I2_S; mainline: MOSTLY_Q1_0)
    to 37 (MOSTLY_TQ2_0) when it converted I2_S tensors;
  * copies every other key and tensor byte for byte, in the same order.
The output is deterministic (same input -> same bytes). The JSON effect record says what changed.

Caveat recorded in the effect record: mainline's ``bitnet`` graph uses SiLU in the FFN; Microsoft's
2B-4T model was trained with squared ReLU (notes: BitNet issues 588, 602). Transcoding cannot change
what the engine computes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from parity_both.gguf.constants import BITNET_FORK_ARCHS, MAINLINE_BITNET_ARCH, TYPE_IDS
from parity_both.gguf.quants import REFUSED_TYPES, i2s_to_tq2_0
from parity_both.gguf.reader import GGUFError, GGUFFile, read_gguf, sha256_file
from parity_both.gguf.writer import (
    RawKV,
    TensorSpec,
    kv_str,
    kv_u32,
    raw_kv_scalar,
    raw_kv_str,
    read_raw_kvs,
    write_gguf,
)

MAINLINE_ARCH = MAINLINE_BITNET_ARCH
FTYPE_FORK_I2_S = 40
FTYPE_MOSTLY_TQ2_0 = 37
# mainline ids for the types we copy unchanged (the reader resolved names under either numbering)
_MAINLINE_IDS = {name: tid for name, tid in TYPE_IDS.items() if name != "I2_S"}


def refuse_unreadable(src: GGUFFile) -> None:
    """Raise GGUFError naming the first tensor of a BitNet.cpp type whose bytes cannot be interpreted."""
    for name, t in src.tensors.items():
        if t.type_name in REFUSED_TYPES:
            raise GGUFError(f"{src.path}: tensor {name!r} is {t.type_name}: {REFUSED_TYPES[t.type_name]}")


def mainline_kvs(
    in_path: str | Path, arch: str, *, file_type: int | None = None, file_type_from: int | None = None
) -> tuple[list[RawKV], dict[str, str], dict[str, Any]]:
    """The file's metadata for mainline llama.cpp: BitNet.cpp's fork architecture (and every
    ``<fork arch>.*`` key) renamed to mainline's ``bitnet``; ``general.file_type`` set to ``file_type``
    (when given, and only if it currently equals ``file_type_from`` when that is given; added at the
    end when the key is absent and no ``file_type_from`` is required); every other key byte for byte,
    in order. Returns (kvs, renamed keys {old: new}, changed values {key: {from, to}})."""
    new_arch = MAINLINE_ARCH if arch in BITNET_FORK_ARCHS else arch
    kvs: list[RawKV] = []
    renamed: dict[str, str] = {}
    changed: dict[str, Any] = {}
    for kv in read_raw_kvs(in_path):
        key = kv.key
        if key == "general.architecture":
            if raw_kv_str(kv) != new_arch:
                changed[key] = {"from": raw_kv_str(kv), "to": new_arch}
            kvs.append(kv_str(key, new_arch))
            continue
        if key == "general.file_type" and file_type is not None:
            old = raw_kv_scalar(kv)
            if file_type_from is None or old == file_type_from:
                if old != file_type:
                    changed[key] = {"from": old, "to": file_type}
                kvs.append(kv_u32(key, file_type))
                continue
        for fork in BITNET_FORK_ARCHS:
            if key.startswith(fork + "."):
                renamed[key] = key = new_arch + key[len(fork) :]
                break
        kvs.append(RawKV(key, kv.vtype, kv.value))
    if file_type is not None and file_type_from is None and not any(k.key == "general.file_type" for k in kvs):
        changed["general.file_type"] = {"from": None, "to": file_type}
        kvs.append(kv_u32("general.file_type", file_type))
    if len({kv.key for kv in kvs}) != len(kvs):
        raise GGUFError(f"{in_path}: renaming keys to the {new_arch!r} prefix would duplicate keys")
    return kvs, renamed, changed


def _tensor_specs(src: GGUFFile) -> tuple[list[TensorSpec], list[str], list[float]]:
    """Every tensor for the output: I2_S rewritten as TQ2_0, the others copied byte for byte."""
    tensors: list[TensorSpec] = []
    transcoded: list[str] = []
    rel_changes: list[float] = []
    for name, t in src.tensors.items():
        if t.type_name == "I2_S":
            if t.shape[0] % 256:
                raise GGUFError(
                    f"{src.path}: I2_S tensor {name!r} has rows of {t.shape[0]} elements; "
                    "TQ2_0 needs multiples of 256 (no lossless mainline type for it)"
                )
            data, rel = i2s_to_tq2_0(src.raw(name), t.n_elements)
            rel_changes.append(rel)
            transcoded.append(name)
            tensors.append(TensorSpec(name, t.shape, "TQ2_0", lambda d=data: d))
            continue
        if t.type_name not in _MAINLINE_IDS:
            raise GGUFError(f"{src.path}: tensor {name!r} has type {t.type_name}, unknown to mainline")
        tensors.append(
            TensorSpec(
                name,
                t.shape,
                t.type_name,
                lambda n=name: bytes(src.raw(n)),
                type_id=_MAINLINE_IDS[t.type_name],
                size=t.nbytes,
            )
        )
    return tensors, transcoded, rel_changes


def transcode(in_path: str | Path, out_path: str | Path) -> dict[str, Any]:
    """Write the mainline-loadable copy; return the effect record."""
    in_path, out_path = Path(in_path), Path(out_path)
    if in_path.resolve() == out_path.resolve():
        raise ValueError("output must differ from input")
    src = read_gguf(in_path)
    refuse_unreadable(src)
    n_i2s = sum(t.type_name == "I2_S" for t in src.tensors.values())
    kvs, renamed, changed = mainline_kvs(
        in_path, src.architecture, file_type_from=FTYPE_FORK_I2_S, file_type=FTYPE_MOSTLY_TQ2_0 if n_i2s else None
    )
    tensors, transcoded, rel_changes = _tensor_specs(src)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        written = write_gguf(out_path, kvs, tensors, alignment=src.alignment)
    finally:
        src.close()
    return {
        "source": str(in_path),
        "source_sha256": sha256_file(in_path),
        "source_architecture": src.architecture,
        "source_type_numbering": src.type_numbering,
        "source_type_numbering_reason": src.type_numbering_reason,
        "output": str(out_path),
        "output_sha256": written.sha256,
        "output_architecture": MAINLINE_ARCH if src.architecture in BITNET_FORK_ARCHS else src.architecture,
        "tensors_transcoded": len(transcoded),
        "tensors_transcoded_names": transcoded,
        "transcode": "I2_S -> TQ2_0 (ternary codes bit-exact; per-tensor f32 scale -> per-block fp16)",
        "max_rel_scale_change": max(rel_changes) if rel_changes else 0.0,
        "tensors_copied": len(tensors) - len(transcoded),
        "keys_renamed": renamed,
        "keys_changed": changed,
        "caveat": (
            "mainline 'bitnet' computes the FFN with SiLU; BitNet b1.58 2B-4T was trained with "
            "squared ReLU - transcoding does not change the engine's activation"
        ),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m parity_both.gguf.transcode",
        description="BitNet.cpp I2_S / bitnet-b1.58 GGUF -> mainline-loadable GGUF",
    )
    ap.add_argument("input")
    ap.add_argument("output")
    a = ap.parse_args(argv)
    try:
        record = transcode(a.input, a.output)
    except (GGUFError, ValueError) as e:
        print(f"transcode: error: {e}", file=sys.stderr)
        return 2
    json.dump(record, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
