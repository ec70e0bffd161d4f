"""The lossless twin of a GGUF model: every tensor dequantized, metadata and vocabulary unchanged.

Graph parity is judged on the twin, where the noise floor is ~1e-7 instead of the quantized model's
~1e-2 (issue 10). ``write_twin(src, dst, dtype="F32")`` writes every tensor dequantized with
``parity_both.gguf.quants`` (every type we read, BitNet.cpp's I2_S and TQ1_0/TQ2_0 included) as F32,
or as F16 / BF16 for large models. With F16 / BF16, 1-D tensors (norms, scales) stay F32 as llama.cpp's
own converter keeps them; what the conversion rounded is recorded per tensor. ``dtype="auto"`` (the
config default) picks F16, else BF16, for a model with ternary matrices when that is provably exact
(judged from the block scales alone, `auto_dtype`), F32 otherwise. Before writing, the twin's size is
checked against the free space of the target's filesystem (less DISK_RESERVE): a twin that would fill
the disk is refused (TwinDiskError, exit 2) instead of written.

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
import shutil
import sys
import time
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
TWIN_CHOICES = (*TWIN_DTYPES, "auto")
DISK_RESERVE = 1 << 30  # bytes left free on the twin's filesystem
# ternary types whose values are q * d, q in {-1, 0, 1, 2}, d an fp16 at this offset of each block
_TERNARY_F16_SCALE = {"TQ1_0": (54, 52), "TQ2_0": (66, 64)}
_TERNARY = (*_TERNARY_F16_SCALE, "I2_S")


class TwinDiskError(ValueError):
    """The twin would not fit the disk budget (exit code 2, as a bad model)."""

    code = 2
    kind = "disk"


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


def _scales_exact(g: GGUFFile, t: TensorInfo, dtype: str) -> bool:
    """Whether every value of a ternary tensor (q * d) is exact in `dtype`, from its scales alone."""
    raw = g.raw(t.name)
    if t.type_name == "I2_S":
        n4 = t.n_elements // 4
        d = np.frombuffer(raw[n4 : n4 + 4].tobytes(), dtype="<f4").astype(np.float32)
    else:
        size, off = _TERNARY_F16_SCALE[t.type_name]
        d = np.ascontiguousarray(raw.reshape(-1, size)[:, off : off + 2]).view("<f2").astype(np.float32).ravel()
    values = np.concatenate([d, np.float32(2) * d])  # q = 2 (TQ2_0 code 3) included: conservative
    return to_dtype(values, dtype)[2] == 0


def _tensor_exact(g: GGUFFile, t: TensorInfo, dtype: str) -> bool:
    out_type = tensor_dtype(t, dtype)
    if out_type in ("F32", t.type_name):
        return True
    if t.type_name in _TERNARY:
        return _scales_exact(g, t, out_type)
    return all(to_dtype(v, out_type)[2] == 0 for v in dequantized_chunks(g, t))


def auto_dtype(g: GGUFFile) -> str:
    """The twin dtype `auto` stands for: F16, else BF16, when the model has ternary matrices and the
    conversion is exact for every tensor (ternary ones judged from their scales); else F32."""
    if not any(t.type_name in _TERNARY for t in g.tensors.values()):
        return "F32"
    for dtype in ("F16", "BF16"):
        if all(_tensor_exact(g, t, dtype) for t in g.tensors.values()):
            return dtype
    return "F32"


def twin_bytes(g: GGUFFile, dtype: str) -> int:
    """The twin's tensor data size (header excluded)."""
    item = {"F32": 4, "F16": 2, "BF16": 2}
    return sum(t.n_elements * item[tensor_dtype(t, dtype)] for t in g.tensors.values())


def check_disk(dst: Path, nbytes: int, reserve: int | None = None) -> None:
    """Refuse (TwinDiskError) a twin of `nbytes` that would leave less than `reserve` (default
    DISK_RESERVE) free."""
    reserve = DISK_RESERVE if reserve is None else reserve
    free = shutil.disk_usage(dst.parent).free
    if nbytes + reserve > free:
        raise TwinDiskError(
            f"twin {dst.name} needs {nbytes / 2**30:.1f} GiB but {dst.parent} has {free / 2**30:.1f} GiB free "
            f"(keeping {reserve / 2**30:.1f} GiB): set `twin: F16`, `BF16` or `off` for this model, or free space"
        )


def _progress_lines(g: GGUFFile, dtype: str, progress: Progress | None) -> Progress:
    """`progress` plus a line on stderr at most every 5 s: tensors done, MB written, rate."""
    total = twin_bytes(g, dtype) / 2**20
    t0, last, mb = time.monotonic(), [time.monotonic()], [0.0]
    item = {"F32": 4, "F16": 2, "BF16": 2}

    def report(done: int, n: int, name: str) -> None:
        t = g.tensors[name]
        mb[0] += t.n_elements * item[tensor_dtype(t, dtype)] / 2**20
        now = time.monotonic()
        if now - last[0] >= 5.0 or (done == n and now - t0 >= 5.0):
            last[0] = now
            rate = mb[0] / max(now - t0, 1e-9)
            print(
                f"[twin] {done}/{n} tensors, {mb[0]:.0f}/{total:.0f} MB, {rate:.1f} MB/s", file=sys.stderr, flush=True
            )
        if progress is not None:
            progress(done, n, name)

    return report


def write_twin(
    src: str | Path, dst: str | Path, dtype: str = "F32", progress: Progress | None = None
) -> dict[str, Any]:
    """Write the lossless twin of ``src`` to ``dst``; return its record (JSON-able, deterministic).
    ``dtype`` may be ``auto`` (see `auto_dtype`); the record's ``dtype`` is the one written."""
    requested = dtype
    if dtype != "auto":
        _check_dtype(dtype)
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError("the twin must not overwrite its source")
    g = read_gguf(src)
    try:
        refuse_unreadable(g)
        dtype = auto_dtype(g) if dtype == "auto" else dtype
        dst.parent.mkdir(parents=True, exist_ok=True)
        check_disk(dst, twin_bytes(g, dtype))
        progress = _progress_lines(g, dtype, progress)
        kvs, renamed, changed = mainline_kvs(src, g.architecture, file_type=FILE_TYPES[dtype])
        per_tensor: dict[str, dict[str, Any]] = {}
        n_done = [0]

        def done(name: str) -> None:
            n_done[0] += 1
            if progress is not None:
                progress(n_done[0], len(g.tensors), name)

        specs = [_twin_spec(g, t, dtype, per_tensor, done) for t in g.tensors.values()]
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
        "requested_dtype": requested,
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
    ap.add_argument("--dtype", default="F32", choices=TWIN_CHOICES)
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
