"""The lossless twin of a GGUF model: every tensor dequantized, metadata and vocabulary unchanged.

Graph parity is judged on the twin, where the noise floor is ~1e-7 instead of the quantized model's
~1e-2 (issue 10). ``write_twin(src, dst, dtype="F32")`` writes every tensor dequantized with
``parity_both.gguf.quants`` (every type we read, BitNet.cpp's I2_S and TQ1_0/TQ2_0 included) as F32,
or as F16 / BF16 for large models. With F16 / BF16, 1-D tensors (norms, scales) stay F32 as llama.cpp's
own converter keeps them; what the conversion rounded is recorded per tensor.

Metadata is copied byte for byte (raw key/value copy) except:
  * ``general.file_type`` -> the twin dtype (llama.h LLAMA_FTYPE_ALL_F32 = 0, MOSTLY_F16 = 1, MOSTLY_BF16 = 32);
  * a BitNet.cpp-format file (fork architecture such as ``bitnet-b1.58``) gets mainline's ``bitnet``
    prefix exactly as ``transcode`` renames it, so mainline lanes load the twin.
Tensors are streamed in chunks (bounded memory) into a temporary file in the target directory that is
moved into place at the end: a killed job leaves no half-written twin.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from parity_both.gguf import quants
from parity_both.gguf.constants import FILE_TYPES, I2S_BLOCK
from parity_both.gguf.lowlevel import TYPE_BLOCKS
from parity_both.gguf.reader import GGUFError, GGUFFile, TensorInfo, read_gguf, sha256_file
from parity_both.gguf.transcode import mainline_kvs, refuse_unreadable
from parity_both.gguf.writer import TensorSpec, write_gguf

TWIN_DTYPES = ("F32", "F16", "BF16")
CHUNK_ELEMENTS = 1 << 22  # values dequantized at a time (16 MB as float32)

Progress = Callable[[int, int, str], None]  # (tensors done, tensors in all, tensor name)


def _check_dtype(dtype: str) -> None:
    if dtype not in TWIN_DTYPES:
        raise ValueError(f"twin dtype must be one of {TWIN_DTYPES}, got {dtype!r}")


def tensor_dtype(t: TensorInfo, dtype: str) -> str:
    """The type a tensor gets in the twin: 1-D tensors stay F32 whatever the twin dtype."""
    return "F32" if len(t.shape) <= 1 else dtype


def dequantized_chunks(src: GGUFFile, t: TensorInfo, chunk_elements: int | None = None) -> Iterator[np.ndarray]:
    """The tensor's float32 values in file order (ggml ne[0] fastest), a bounded chunk at a time
    (``chunk_elements``, default CHUNK_ELEMENTS, rounded down to whole blocks)."""
    chunk_elements = chunk_elements or CHUNK_ELEMENTS
    raw = src.raw(t.name)
    n = t.n_elements
    if t.type_name == "I2_S":  # blocks of 128 elements in 32 bytes, one per-tensor scale after them
        blk, size, tail = I2S_BLOCK, I2S_BLOCK // 4, raw[n // 4 :]
    else:
        blk, size = TYPE_BLOCKS[t.type_name]
        tail = None
    step = max(1, chunk_elements // blk) * blk
    for start in range(0, n, step):
        count = min(step, n - start)
        part = raw[start // blk * size : (start + count) // blk * size]
        if tail is not None:
            part = np.concatenate([part, tail])
        yield quants.dequantize(part, t.type_name, count)


def to_dtype(values: np.ndarray, dtype: str) -> tuple[bytes, float, int]:
    """(encoded bytes, max |rounded - value|, count of values the encoding changed)."""
    if dtype == "F32":
        return values.astype("<f4").tobytes(), 0.0, 0
    if dtype == "F16":
        enc = values.astype("<f2")
        back = enc.astype(np.float32)
    elif dtype == "BF16":  # ggml_compute_fp32_to_bf16: NaN forced quiet, round to nearest even
        bits = values.astype("<f4").view(np.uint32)
        bits = np.where((bits & 0x7FFFFFFF) > 0x7F800000, (bits & np.uint32(0xFFFF0000)) | np.uint32(64 << 16), bits)
        enc = ((bits.astype(np.uint64) + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype("<u2")
        back = (enc.astype(np.uint32) << 16).view(np.float32)
    else:
        raise ValueError(f"twin dtype must be one of {TWIN_DTYPES}, got {dtype!r}")
    same = (back == values) | (np.isnan(back) & np.isnan(values))
    n_changed = int(values.size - np.count_nonzero(same))
    if not n_changed:
        return enc.tobytes(), 0.0, 0
    with np.errstate(invalid="ignore", over="ignore"):
        delta = np.abs(back[~same].astype(np.float64) - values[~same].astype(np.float64))
    return enc.tobytes(), float(np.nanmax(delta)) if np.isfinite(delta).any() else float("inf"), n_changed


def _json_float(x: float) -> float | str:
    return x if np.isfinite(x) else str(x)


def _twin_spec(
    src: GGUFFile, t: TensorInfo, dtype: str, record: dict[str, Any], done: Callable[[str], None]
) -> TensorSpec:
    out_type = tensor_dtype(t, dtype)
    entry: dict[str, Any] = {"source_type": t.type_name, "type": out_type}
    record[t.name] = entry

    def produce() -> Iterator[bytes]:
        max_delta, n_changed = 0.0, 0
        for values in dequantized_chunks(src, t):
            data, d, c = to_dtype(values, out_type)
            max_delta, n_changed = max(max_delta, d), n_changed + c
            yield data
        src.release(t.name)
        if out_type == "F32":
            entry["rounded"] = "exact"
        else:
            entry.update(max_abs_delta=_json_float(max_delta), n_changed=n_changed)
        done(t.name)

    return TensorSpec(t.name, t.shape, out_type, produce)


def write_twin(
    src: str | Path, dst: str | Path, dtype: str = "F32", progress: Progress | None = None
) -> dict[str, Any]:
    """Write the lossless twin of ``src`` to ``dst``; return its record (JSON-able, deterministic)."""
    _check_dtype(dtype)
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError("the twin must not overwrite its source")
    g = read_gguf(src)
    try:
        refuse_unreadable(g)
        kvs, renamed, changed = mainline_kvs(src, g.architecture, file_type=FILE_TYPES[dtype])
        per_tensor: dict[str, dict[str, Any]] = {}
        n_done = [0]

        def done(name: str) -> None:
            n_done[0] += 1
            if progress is not None:
                progress(n_done[0], len(g.tensors), name)

        specs = [_twin_spec(g, t, dtype, per_tensor, done) for t in g.tensors.values()]
        dst.parent.mkdir(parents=True, exist_ok=True)
        written = write_gguf(dst, kvs, specs, alignment=g.alignment)
    finally:
        g.close()
    arch = changed.get("general.architecture")
    return {
        "source": {
            "path": str(src),
            "sha256": sha256_file(src),
            "architecture": g.architecture,
            "type_counts": g.type_counts(),
        },
        "twin": {"path": str(dst), "sha256": written.sha256, "bytes": written.bytes},
        "dtype": dtype,
        "exact": all(e.get("rounded") == "exact" or e.get("n_changed") == 0 for e in per_tensor.values()),
        "arch_rename": arch,
        "keys_renamed": renamed,
        "keys_changed": changed,
        "tensors": per_tensor,
    }


def twin_is_exact(src: str | Path, dtype: str) -> bool:
    """Whether a ``dtype`` twin of ``src`` holds every dequantized value exactly (F32 always does)."""
    _check_dtype(dtype)
    if dtype == "F32":
        return True
    g = read_gguf(src)
    try:
        refuse_unreadable(g)
        for t in g.tensors.values():
            out_type = tensor_dtype(t, dtype)
            for values in dequantized_chunks(g, t):
                if to_dtype(values, out_type)[2]:
                    return False
            g.release(t.name)
    finally:
        g.close()
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m parity_both.gguf.twin", description="Write the lossless (dequantized) twin of a GGUF model"
    )
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--dtype", default="F32", choices=TWIN_DTYPES)
    a = ap.parse_args(argv)
    try:
        record = write_twin(a.input, a.output, a.dtype)
    except (GGUFError, ValueError) as e:
        print(f"twin: error: {e}", file=sys.stderr)
        return 2
    json.dump(record, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
