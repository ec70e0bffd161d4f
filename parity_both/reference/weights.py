"""Weights for the reference: dequantization, per-tensor streaming access, prepared-weights cache.

Nothing here holds the whole model in memory. Every matrix is reached through a `Weight` handle
that dequantizes it (or a block of its rows) on demand from the memory-mapped GGUF, or reads it
from a *prepared-weights cache*: one file of already-dequantized values, memory-mapped and paged
out again (madvise DONTNEED) as soon as a tensor has been used, except a bounded resident set
(the LM head first). Peak memory is therefore about the resident set plus one layer plus one
chunk of the LM head, whatever the model size.

Dequantization: fast NumPy code for F32/F16/BF16/Q4_0/Q4_1/Q8_0/TQ2_0 (bit-identical to
`gguf.quants.dequantize`) and I2_S (bit-identical to `parity_both.gguf.quants`), asserted in tests;
every other type through `parity_both.gguf.quants` (gguf.quants plus Q8_1/Q1_0), imported lazily
because gguf costs ~0.15 s to import.

Prepared cache layout (directory `prepared_dir`, written by `prepare_weights`, deterministic;
`prepare_ephemeral` writes the same blob to an anonymous in-memory file for a single run):
    manifest.json   model identity (size, sha256, quick fingerprint), the GGUF header without its
                    arrays (so a warm run need not parse the tokenizer), per-tensor offset/dtype
    weights.bin     concatenated little-endian arrays, each 4096-byte aligned
Every matrix that is not already F32 in the GGUF is stored (F32 ones are read in place): ternary
ones (TQ1_0, TQ2_0, I2_S) as int8 codes plus float32 scales (1 byte per weight: the cache scales
with the file, not with float32), turned back into float32 per matrix (or LM-head chunk) at matmul
time by the same single float32 multiply `q * d` the dequantizers do, so values are bit-identical;
every other type as float32, within a disk budget (`budget_bytes`, default BUDGET_FACTOR x the
model file): matrices beyond it are dequantized from the GGUF at each use instead.
(Storing fp16-exact ternary values as float16 halves the float32 file but was measured 6x slower
per decode step: NumPy's float16 -> float32 conversion costs more than reading twice the bytes;
int8 -> float32 with a scale costs ~25 ms for a 6912 x 2560 matrix, dequantizing TQ2_0 ~550 ms.)
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from parity_both.gguf.reader import GGUFFile, TensorInfo, read_gguf, sha256_file
from parity_both.progress import Progress

MODES = ("exact", "ggml")

PREPARED_FORMAT = "parity-both-prepared-weights/2"
# Default disk budget of a prepared cache, as a multiple of the model file's size.
BUDGET_FACTOR = 4.0
# Ternary types cached as int8 codes + float32 scales: type -> (block elements, block bytes, offset
# of the fp16 block scale) or None for I2_S (one float32 scale after the packed codes).
TERNARY_BLOCKS: dict[str, tuple[int, int, int] | None] = {"TQ1_0": (256, 54, 52), "TQ2_0": (256, 66, 64), "I2_S": None}
_ALIGN = 4096
# Upper bound for one dense block of a matrix (bytes of float32): the LM head is processed in
# row chunks of at most this size so it never sits in memory whole.
CHUNK_BYTES = 32 << 20
# Prepared-cache pages kept mapped between uses (the rest is paged out after each use): at most
# RESIDENT_BYTES, and at most half the model file + 100 MiB (the RSS bound for big ternary models is
# file size * 1.5 + 200 MiB). Measured on SmolLM2 (16 decode steps): resident 0 / 147 / 538 MiB
# -> decode 1.6 / 1.44 / 1.17 s, peak RSS 96 / 215 / 582 MiB.
RESIDENT_BYTES = 224 << 20
_LM_HEADS = ("output.weight", "token_embd.weight")
PROGRESS_S = 5.0  # at most one progress line per this many seconds
# Types read in place from the GGUF (no cache entry needed). F16 is cached as float32 too:
# converting it at every use costs more than reading twice the bytes.
_IN_PLACE = ("F32",)


# --------------------------------------------------------------------------------------------
# Dequantization
# --------------------------------------------------------------------------------------------
def _f16_col(blocks: np.ndarray, start: int) -> np.ndarray:
    """An fp16 field of every block as a float32 column [n_blocks, 1]."""
    return np.ascontiguousarray(blocks[:, start : start + 2]).view(np.float16).astype(np.float32)


def _deq_q8_0(raw: np.ndarray) -> np.ndarray:
    blocks = raw.reshape(-1, 34)
    out = blocks[:, 2:].view(np.int8).astype(np.float32)
    out *= _f16_col(blocks, 0)
    return out


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] packed bytes -> float32 [n, 32]: low nibbles are elements 0..15, high 16..31."""
    out = np.empty((qs.shape[0], 32), dtype=np.float32)
    np.bitwise_and(qs, 0x0F, out=out[:, :16], casting="unsafe")
    np.right_shift(qs, 4, out=out[:, 16:], casting="unsafe")
    return out


def _deq_q4_0(raw: np.ndarray) -> np.ndarray:
    blocks = raw.reshape(-1, 18)
    out = _nibbles(blocks[:, 2:])
    out -= np.float32(8)  # small integers: exact, same values as gguf's int8 (q - 8)
    out *= _f16_col(blocks, 0)
    return out


def _deq_q4_1(raw: np.ndarray) -> np.ndarray:
    blocks = raw.reshape(-1, 20)
    out = _nibbles(blocks[:, 4:])
    out *= _f16_col(blocks, 0)  # d * q, then + m: the same two float32 roundings as gguf
    out += _f16_col(blocks, 2)
    return out


def _deq_f16(raw: np.ndarray) -> np.ndarray:
    return raw.view(np.float16).astype(np.float32)


def _deq_bf16(raw: np.ndarray) -> np.ndarray:
    return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _deq_f32(raw: np.ndarray) -> np.ndarray:
    return raw.view(np.float32)


def _ternary_lut(shifts: tuple[int, ...], values: tuple[int, ...]) -> np.ndarray:
    """[256, len(shifts)] float32: the ternary value of each 2-bit field of every byte value."""
    codes = (np.arange(256, dtype=np.uint8)[:, None] >> np.array(shifts, dtype=np.uint8)) & 3
    return np.array(values, dtype=np.float32)[codes]


# TQ2_0 (gguf: q = code - 1, element m + 32*l of a 32-byte group at shift 2*l);
# I2_S (BitNet.cpp x86: element g*32 + byte at shift 6 - 2*g; codes -1, 0, +1, and 3 reads as 0)
_TQ2_LUT = _ternary_lut((0, 2, 4, 6), (-1, 0, 1, 2))
_I2S_LUT = _ternary_lut((6, 4, 2, 0), (-1, 0, 1, 0))


def _deq_tq2_0(raw: np.ndarray) -> np.ndarray:
    blocks = raw.reshape(-1, 66)
    vals = _TQ2_LUT[blocks[:, :64].reshape(-1, 2, 32)]  # [n, group, byte, field]
    out = np.ascontiguousarray(vals.transpose(0, 1, 3, 2)).reshape(-1, 256)
    out *= _f16_col(blocks, 64)  # d * q in float32, as gguf
    return out


def _deq_i2_s(raw: np.ndarray, n_elements: int) -> np.ndarray:
    packed = raw[: n_elements // 4].reshape(-1, 32)
    scale = np.frombuffer(raw[n_elements // 4 : n_elements // 4 + 4].tobytes(), dtype="<f4")[0]
    vals = _I2S_LUT[packed]  # [n_blocks, byte, field]
    out = np.ascontiguousarray(vals.transpose(0, 2, 1)).reshape(-1)
    out *= scale  # t * scale in float32, as parity_both.gguf.quants
    return out


FAST_DEQUANT: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "F32": _deq_f32,
    "F16": _deq_f16,
    "BF16": _deq_bf16,
    "Q4_0": _deq_q4_0,
    "Q4_1": _deq_q4_1,
    "Q8_0": _deq_q8_0,
    "TQ2_0": _deq_tq2_0,
}
# (block elements, block bytes) of the fast types, to cut row ranges out of raw data.


def dequantize_generic(raw: np.ndarray, type_name: str, n_elements: int) -> np.ndarray:
    """Any other type: parity_both.gguf.quants (gguf.quants plus I2_S, Q8_1, Q1_0), imported lazily
    because gguf costs ~0.15 s to import."""
    from parity_both.gguf import quants  # noqa: PLC0415 - lazy: imports gguf

    try:
        return np.asarray(quants.dequantize(raw, type_name, n_elements), dtype=np.float32).reshape(-1)
    except (NotImplementedError, quants.QuantError) as e:
        raise NotImplementedError(f"cannot dequantize tensor type {type_name}: {e}") from e


def dequantize(raw: np.ndarray, type_name: str, n_elements: int) -> np.ndarray:
    """Raw tensor bytes -> flat float32 [n_elements] (values identical to gguf.quants.dequantize)."""
    fast = FAST_DEQUANT.get(type_name)
    if fast is not None:
        return fast(raw).reshape(-1)
    if type_name == "I2_S":
        return _deq_i2_s(raw, n_elements)
    return dequantize_generic(raw, type_name, n_elements)


# --------------------------------------------------------------------------------------------
# Prepared-weights cache
# --------------------------------------------------------------------------------------------
def quick_fingerprint(path: str | Path, header_bytes: int) -> str:
    """Cheap, deterministic model identity for cache validation: the size, the whole GGUF header
    (metadata + tensor table, `header_bytes` long) and the last MiB (a few ms, not a full sha256)."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(f"{size}:{header_bytes}".encode())
    with open(path, "rb") as fh:
        h.update(fh.read(header_bytes))
        fh.seek(max(0, size - (1 << 20)))
        h.update(fh.read(1 << 20))
    return h.hexdigest()


def _header_record(g: GGUFFile) -> dict[str, Any]:
    """What the reference needs of the GGUF header, so a valid cache spares re-parsing it (the
    tokenizer arrays make that ~0.1-0.2 s): scalar metadata (arrays become {"array_len": n}) and
    the tensor table."""
    meta = {k: ({"array_len": len(v)} if isinstance(v, list) else v) for k, v in g.metadata.items()}
    return {
        "version": g.version,
        "alignment": g.alignment,
        "data_offset": g.data_offset,
        "type_numbering": g.type_numbering,
        "type_numbering_reason": g.type_numbering_reason,
        "metadata": meta,
        "tensors": [[t.name, list(t.shape), t.type_id, t.type_name, t.offset, t.nbytes] for t in g.tensors.values()],
    }


def gguf_from_manifest(model_path: str | Path, manifest: dict[str, Any]) -> GGUFFile:
    """A GGUFFile (metadata without arrays) rebuilt from a validated manifest's header record."""
    h = manifest["gguf"]
    tensors = {r[0]: TensorInfo(r[0], tuple(r[1]), r[2], r[3], r[4], r[5]) for r in h["tensors"]}
    return GGUFFile(
        path=Path(model_path),
        version=h["version"],
        metadata=dict(h["metadata"]),
        tensors=tensors,
        alignment=h["alignment"],
        data_offset=h["data_offset"],
        type_numbering=h["type_numbering"],
        type_numbering_reason=h["type_numbering_reason"],
    )


def cached_tensor_names(g: GGUFFile) -> list[str]:
    """The tensors a prepared cache may hold: every matrix not stored as F32 in the GGUF."""
    return [n for n, t in g.tensors.items() if len(t.shape) >= 2 and t.type_name not in _IN_PLACE]


def _cached_bytes(t: TensorInfo) -> int:
    rows, cols = t.rows_cols
    return rows * cols * (1 if t.type_name in TERNARY_BLOCKS else 4)


def plan_cache(g: GGUFFile, budget_bytes: int | None) -> list[str]:
    """The matrices to cache, in file order: every ternary one (1 byte per weight), then float32
    ones (LM head first, then file order) while they fit in what the budget leaves; None: no limit."""
    names = cached_tensor_names(g)
    chosen = {n for n in names if g.tensors[n].type_name in TERNARY_BLOCKS}
    left = None if budget_bytes is None else budget_bytes - sum(_cached_bytes(g.tensors[n]) for n in chosen)
    for n in sorted((n for n in names if n not in chosen), key=lambda n: n not in _LM_HEADS):
        size = _cached_bytes(g.tensors[n])
        if left is None or size <= left:
            chosen.add(n)
            left = None if left is None else left - size
    return [n for n in names if n in chosen]


def _iter_row_chunks(t: TensorInfo, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, int]]:
    rows, cols = t.rows_cols
    step = max(1, chunk_bytes // (4 * cols))
    if t.type_name == "I2_S":  # per-tensor scale at the end: one piece
        step = rows
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def ternary_expand(codes: np.ndarray, scales: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """int8 codes [n, cols] and their scales ([n, cols / 256] per block, or [1] per tensor) ->
    float32 q * d: the one float32 rounding the dequantizers make, hence the same bits. `out`: a
    float32 [n, cols] buffer to fill (reusing one spares faulting in fresh pages for every matrix)."""
    if out is None:
        out = np.empty(codes.shape, dtype=np.float32)
    if scales.size == 1 and scales.ndim == 1:
        np.multiply(codes, scales[0], out=out)
    else:
        n, nb = codes.shape[0], scales.shape[1]
        np.multiply(codes.reshape(n, nb, -1), scales[:, :, None], out=out.reshape(n, nb, -1))
    return out


def _ternary_scales(g: GGUFFile, t: TensorInfo, r0: int, r1: int) -> np.ndarray:
    rows, cols = t.rows_cols
    raw = g.raw(t.name)
    spec = TERNARY_BLOCKS[t.type_name]
    if spec is None:  # I2_S: one float32 scale after the packed codes
        n4 = rows * cols // 4
        return np.frombuffer(raw[n4 : n4 + 4].tobytes(), dtype="<f4").astype(np.float32)
    be, bb, off = spec
    row_bytes = t.nbytes // rows
    blocks = raw[r0 * row_bytes : r1 * row_bytes].reshape(-1, bb)
    return _f16_col(blocks, off).reshape(r1 - r0, cols // be)


def ternary_codes(g: GGUFFile, t: TensorInfo, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Rows [r0, r1) of a ternary matrix as (int8 codes, scales) whose `ternary_expand` equals
    `dequantize_rows` bit for bit, or None when it would not (e.g. a zero or non-finite scale)."""
    f = dequantize_rows(g, t, r0, r1)
    scales = _ternary_scales(g, t, r0, r1)
    d = scales if scales.ndim == 1 else np.repeat(scales, f.shape[1] // scales.shape[1], axis=1)
    with np.errstate(all="ignore"):
        q = np.rint(f / d)
    if not np.all(np.isfinite(q)) or np.abs(q).max(initial=0) > 2:
        return None
    codes = q.astype(np.int8)
    if not np.array_equal(ternary_expand(codes, scales).view(np.uint32), f.view(np.uint32)):
        return None
    return codes, scales


def _write_ternary(g: GGUFFile, t: TensorInfo, out: BinaryIO, offset: int) -> tuple[dict[str, Any], int] | None:
    """Codes (int8, chunk by chunk) then scales (float32, aligned) of one ternary matrix at `offset`;
    (entry, new offset), or None (nothing kept written) if some chunk is not exactly representable."""
    rows, cols = t.rows_cols
    start = offset
    scale_parts = []
    for r0, r1 in _iter_row_chunks(t):
        got = ternary_codes(g, t, r0, r1)
        if got is None:
            out.seek(start)
            out.truncate(start)
            return None
        out.write(got[0].data)
        offset += got[0].nbytes
        scale_parts.append(got[1])
    scales = scale_parts[0] if t.type_name == "I2_S" else np.concatenate(scale_parts)
    pad = (-offset) % _ALIGN
    out.write(b"\0" * pad)
    offset += pad
    entry = {"offset": start, "dtype": "|i1", "rows": rows, "cols": cols, "source_type": t.type_name}
    entry.update(scales_offset=offset, scales_shape=list(scales.shape))
    out.write(np.ascontiguousarray(scales, dtype="<f4").data)
    return entry, offset + scales.nbytes


def _write_blob(g: GGUFFile, out: BinaryIO, budget_bytes: int | None = None) -> tuple[dict[str, dict[str, Any]], int]:
    """Write every planned tensor of `g` into `out`, chunk by chunk; (entries, total bytes)."""
    entries: dict[str, dict[str, Any]] = {}
    offset = 0
    progress = Progress("prepare", sum(_cached_bytes(g.tensors[n]) for n in plan_cache(g, budget_bytes)))
    for name in plan_cache(g, budget_bytes):
        t = g.tensors[name]
        rows, cols = t.rows_cols
        pad = (-offset) % _ALIGN
        out.write(b"\0" * pad)
        offset += pad
        got = _write_ternary(g, t, out, offset) if t.type_name in TERNARY_BLOCKS else None
        if got is not None:
            entries[name], offset = got
        else:
            entries[name] = {"offset": offset, "dtype": "<f4", "rows": rows, "cols": cols, "source_type": t.type_name}
            for r0, r1 in _iter_row_chunks(t):
                b = np.ascontiguousarray(dequantize_rows(g, t, r0, r1), dtype="<f4")
                out.write(b.data)
                offset += b.nbytes
                del b
        g.release(name)
        progress.advance(_cached_bytes(t), name)
    out.flush()
    progress.done()
    return entries, offset


def _manifest(
    model_path: Path, g: GGUFFile, entries: dict[str, Any], nbytes: int, sha256: str | None
) -> dict[str, Any]:
    return {
        "format": PREPARED_FORMAT,
        "model": {
            "file": model_path.name,
            "size": model_path.stat().st_size,
            "sha256": sha256,
            "quick_fingerprint": quick_fingerprint(model_path, g.data_offset),
        },
        "gguf": _header_record(g),
        "bytes": nbytes,
        "tensors": entries,
    }


def default_budget(model_path: str | Path, factor: float | None = None) -> int:
    """The prepared cache's disk budget: `factor` (default BUDGET_FACTOR) x the model file's size."""
    return int(Path(model_path).stat().st_size * (BUDGET_FACTOR if factor is None else factor))


def prepare_weights(
    model_path: str | Path,
    prepared_dir: str | Path,
    *,
    gguf: GGUFFile | None = None,
    budget_factor: float | None = None,
) -> dict[str, Any]:
    """Dequantize every quantized matrix of a model once into `prepared_dir` and return the manifest.

    Deterministic (same model -> same bytes and manifest), atomic (written under temporary names,
    fsync'ed, manifest last), streaming (one chunk of one tensor in memory at a time). Reuses a
    valid existing cache (same file size, GGUF header and last MiB) without rewriting it. Float32
    matrices beyond `budget_factor` x the model file (default BUDGET_FACTOR) are left out.
    """
    model_path = Path(model_path)
    prepared_dir = Path(prepared_dir)
    existing = load_manifest(model_path, prepared_dir)
    if existing is not None:
        return existing
    g = gguf if gguf is not None else read_gguf(model_path)
    prepared_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_bin = tempfile.mkstemp(prefix=".weights.", suffix=".tmp", dir=prepared_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            entries, nbytes = _write_blob(g, out, default_budget(model_path, budget_factor))
            os.fsync(out.fileno())
        os.chmod(tmp_bin, 0o644)
        os.replace(tmp_bin, prepared_dir / "weights.bin")
    except BaseException:
        Path(tmp_bin).unlink(missing_ok=True)
        raise
    manifest = _manifest(model_path, g, entries, nbytes, sha256_file(model_path))
    fd, tmp_man = tempfile.mkstemp(prefix=".manifest.", suffix=".tmp", dir=prepared_dir)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp_man, 0o644)
    os.replace(tmp_man, prepared_dir / "manifest.json")
    return manifest


def prepare_ephemeral(model_path: str | Path, g: GGUFFile, budget_factor: float | None = None) -> PreparedCache:
    """A throw-away cache for one run, in an anonymous in-memory file (memfd: no disk, freed when
    the process ends, even on a crash; its pages count in RSS only while mapped).

    Measured trade-off (kernel 6.18, 2 busy cores, SmolLM2): memfd pages are 4 KiB shmem, so
    re-faulting them after each release costs ~40 ms per decode step more than ext4 page cache
    (large folios); but the first big write into a fresh temp file costs ~1.5-2 s (folio
    allocation) against ~0.3 s here. For runs of tens of steps memfd wins; a persistent
    prepared_dir beats both."""
    fd = os.memfd_create("parity-ref-weights", getattr(os, "MFD_CLOEXEC", 0))
    try:
        with os.fdopen(os.dup(fd), "wb") as out:
            entries, nbytes = _write_blob(g, out, default_budget(model_path, budget_factor))
        manifest = _manifest(Path(model_path), g, entries, nbytes, None)
        return PreparedCache(manifest, fd=fd)
    finally:
        os.close(fd)


def load_manifest(model_path: str | Path, prepared_dir: str | Path) -> dict[str, Any] | None:
    """The cache's manifest if it exists and belongs to this model file, else None."""
    prepared_dir = Path(prepared_dir)
    try:
        manifest = json.loads((prepared_dir / "manifest.json").read_text())
        blob_size = (prepared_dir / "weights.bin").stat().st_size
    except (OSError, ValueError):
        return None
    m = manifest.get("model", {})
    try:
        if (
            manifest.get("format") != PREPARED_FORMAT
            or m.get("size") != Path(model_path).stat().st_size
            or blob_size != manifest.get("bytes")
        ):
            return None
        if m.get("quick_fingerprint") != quick_fingerprint(model_path, manifest["gguf"]["data_offset"]):
            return None
    except (KeyError, TypeError, OSError):
        return None
    return manifest


class PreparedCache:
    """A memory-mapped prepared-weights file.

    Tensors are paged out after use (MADV_DONTNEED) except a resident set of at most
    `resident_bytes`: the LM head first (used at every step), then tensors in file order.
    Re-faulting pages costs ~25-40% of a decode step, so a bounded resident set is kept."""

    def __init__(
        self,
        manifest: dict[str, Any],
        prepared_dir: str | Path | None = None,
        *,
        fd: int | None = None,
        resident_bytes: int | None = None,
    ):
        self.manifest = manifest
        self.ephemeral = fd is not None
        self.entries: dict[str, dict[str, Any]] = manifest["tensors"]
        self._mm: mmap.mmap | None = None
        if manifest["bytes"]:
            if fd is not None:
                self._mm = mmap.mmap(fd, manifest["bytes"], access=mmap.ACCESS_READ)
            else:
                assert prepared_dir is not None, "PreparedCache needs prepared_dir or fd"
                with open(Path(prepared_dir) / "weights.bin", "rb") as fh:
                    self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        order = sorted(self.entries, key=lambda n: (n not in _LM_HEADS, self.entries[n]["offset"]))
        self.resident: set[str] = set()
        if resident_bytes is None:
            resident_bytes = min(RESIDENT_BYTES, manifest["model"]["size"] // 2 + (100 << 20))
        budget = resident_bytes
        for name in order:
            e = self.entries[name]
            size = e["rows"] * e["cols"] * np.dtype(e["dtype"]).itemsize
            if size <= budget:
                self.resident.add(name)
                budget -= size

    def rows(self, name: str, r0: int, r1: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [r0, r1) as float32: a view of the map (float32 entries) or expanded from int8
        codes (into `out` when given)."""
        e = self.entries[name]
        dt = np.dtype(e["dtype"])
        cols = e["cols"]
        a = np.frombuffer(
            self._mm,
            dtype=dt,
            count=(r1 - r0) * cols,  # type: ignore[arg-type]
            offset=e["offset"] + r0 * cols * dt.itemsize,
        ).reshape(r1 - r0, cols)
        if dt == np.float32:
            return a
        shape = e["scales_shape"]
        scales = np.frombuffer(
            self._mm,
            dtype="<f4",
            count=int(np.prod(shape)),  # type: ignore[arg-type]
            offset=e["scales_offset"],
        ).reshape(shape)
        return ternary_expand(a, scales if len(shape) == 1 else scales[r0:r1], out)

    def release(self, name: str, r0: int | None = None, r1: int | None = None) -> None:
        if self._mm is None or name in self.resident:
            return
        e = self.entries[name]
        item = np.dtype(e["dtype"]).itemsize
        r0 = 0 if r0 is None else r0
        r1 = e["rows"] if r1 is None else r1
        start = e["offset"] + r0 * e["cols"] * item
        end = e["offset"] + r1 * e["cols"] * item
        page = (start // mmap.PAGESIZE) * mmap.PAGESIZE
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, page, end - page)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass
            self._mm = None


# --------------------------------------------------------------------------------------------
# Per-tensor access
# --------------------------------------------------------------------------------------------
def dequantize_rows(g: GGUFFile, t: TensorInfo, r0: int, r1: int) -> np.ndarray:
    """Rows [r0, r1) of a tensor's matrix view, as float32 [r1 - r0, cols], from the GGUF."""
    rows, cols = t.rows_cols
    raw = g.raw(t.name)
    if (r0, r1) == (0, rows) or t.type_name == "I2_S":
        full = dequantize(raw, t.type_name, rows * cols).reshape(rows, cols)
        return full if (r0, r1) == (0, rows) else full[r0:r1]
    row_bytes = t.nbytes // rows
    part = raw[r0 * row_bytes : r1 * row_bytes]
    return dequantize(part, t.type_name, (r1 - r0) * cols).reshape(r1 - r0, cols)


@dataclass
class Weight:
    """Handle on one matrix (ggml ne = (cols, rows) -> NumPy [rows, cols]); data fetched lazily.

    `dense()` gives float32 [rows, cols]; `dense_rows(r0, r1)` a block of rows; `raw()` the GGUF
    bytes (for ggml emulation); `release()` pages the data out again after use.
    """

    name: str
    type_name: str
    rows: int
    cols: int
    store: WeightStore = field(repr=False)

    def dense(self) -> np.ndarray:
        return self.dense_rows(0, self.rows)

    def dense_rows(self, r0: int, r1: int) -> np.ndarray:
        return self.store.dense_rows(self.name, r0, r1)

    def raw(self) -> np.ndarray:
        return self.store.gguf.raw(self.name)

    def release(self) -> None:
        self.store.release(self.name)


class WeightStore:
    """All tensors of one model: small vectors resident, matrices streamed, and the matmul.

    `linear(name, x)` is the one place where the reference multiplies by a weight: it owns the
    mode (exact float32 or ggml-emulated), the LM head's row chunking and paging weights out
    after use, so a forward pass reads `x = x + w.linear("blk.3.attn_output", a)`."""

    def __init__(self, g: GGUFFile, cache: PreparedCache | None = None, mode: str = "exact"):
        if mode not in MODES:
            raise ValueError(f"unknown reference mode {mode!r} (expected one of {MODES})")
        self.gguf = g
        self.cache = cache
        self.mode = mode
        self._vectors: dict[str, np.ndarray] = {}
        # progress: `step` is set by the caller (e.g. "decode 3/8"); a line on stderr at most every
        # PROGRESS_S seconds names the layer being computed
        self.step = ""
        self._t0 = self._last = time.monotonic()
        self._scratch = np.empty(0, dtype=np.float32)

    def has(self, name: str) -> bool:
        return name in self.gguf.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.gguf.tensors[name]
        except KeyError as e:
            raise KeyError(f"model has no tensor {name!r}") from e

    def vector(self, name: str) -> np.ndarray:
        """A 1-D tensor (norm weight, bias, rope factors) as float32, kept resident (small)."""
        v = self._vectors.get(name)
        if v is None:
            t = self.info(name)
            v = np.array(dequantize(self.gguf.raw(name), t.type_name, t.n_elements), dtype=np.float32)
            self.gguf.release(name)
            self._vectors[name] = v
        return v

    def matrix(self, name: str) -> Weight:
        t = self.info(name)
        rows, cols = t.rows_cols
        return Weight(name, t.type_name, rows, cols, self)

    def dense_rows(self, name: str, r0: int, r1: int, *, scratch: bool = False) -> np.ndarray:
        """Rows [r0, r1) as float32. scratch=True: int8-cached matrices are expanded into one buffer
        reused by the next such call (for a result consumed at once, as in linear)."""
        if self.cache is not None and name in self.cache.entries:
            out = None
            if scratch and self.cache.entries[name]["dtype"] == "|i1":
                n = (r1 - r0) * self.cache.entries[name]["cols"]
                if self._scratch.size < n:
                    self._scratch = np.empty(n, dtype=np.float32)
                out = self._scratch[:n].reshape(r1 - r0, -1)
            return self.cache.rows(name, r0, r1, out)
        t = self.info(name)
        if t.type_name == "F32":
            cols = t.rows_cols[1]
            return self.gguf.raw(name)[r0 * cols * 4 : r1 * cols * 4].view(np.float32).reshape(r1 - r0, cols)
        return dequantize_rows(self.gguf, t, r0, r1)

    def rows_of(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Selected rows (embedding lookup) as float32 [len(ids), cols]."""
        t = self.info(name)
        rows, cols = t.rows_cols
        out = np.empty((len(ids), cols), dtype=np.float32)
        for i, r in enumerate(ids.tolist()):
            if not 0 <= r < rows:
                raise ValueError(f"token id {r} out of range for {name} ({rows} rows)")
            out[i] = self.dense_rows(name, r, r + 1)[0]
        return out

    def release(self, name: str, r0: int | None = None, r1: int | None = None) -> None:
        if self.cache is not None and name in self.cache.entries:
            self.cache.release(name, r0, r1)
        else:
            self.gguf.release(name)

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        """y = x @ W^T for W = `name`.weight, x [T, cols] -> [T, rows] (ggml_mul_mat(W, x)).

        exact: float32 matmul on the dequantized weight; an LM head is read in row blocks of at
        most CHUNK_BYTES so it never sits in memory whole. ggml: F32 weights as in exact, every
        other type through ggml_emul (activations quantized as ggml does). Pages out afterwards."""
        w = self.matrix(name + ".weight")
        if x.shape[-1] != w.cols:
            raise ValueError(f"{w.name}: input has {x.shape[-1]} features, weight has {w.cols} columns")
        self._tick(name)
        if self.mode == "ggml" and w.type_name != "F32":
            from parity_both.reference.ggml_emul import ggml_linear  # noqa: PLC0415 - imports gguf

            y = np.asarray(
                ggml_linear(np.ascontiguousarray(x, dtype=np.float32), w.raw(), w.type_name, w.rows, w.cols),
                dtype=np.float32,
            )
        else:
            step = max(1, CHUNK_BYTES // (4 * w.cols)) if w.name in _LM_HEADS else w.rows
            if step >= w.rows:
                y = x @ self.dense_rows(w.name, 0, w.rows, scratch=True).T
            else:
                y = np.empty((x.shape[0], w.rows), dtype=np.float32)
                for r0 in range(0, w.rows, step):
                    r1 = min(w.rows, r0 + step)
                    np.matmul(x, self.dense_rows(w.name, r0, r1, scratch=True).T, out=y[:, r0:r1])
                    w.release()
        w.release()
        return y

    def _tick(self, name: str) -> None:
        now = time.monotonic()
        if now - self._last >= PROGRESS_S:
            self._last = now
            n_layer = 1 + max((int(n.split(".")[1]) for n in self.gguf.tensors if n.startswith("blk.")), default=-1)
            where = f"layer {name.split('.')[1]}/{n_layer}" if name.startswith("blk.") else name
            print(f"[reference] {self.step}: {where}, {now - self._t0:.1f} s", file=sys.stderr, flush=True)

    def linear_rows(self, name: str, r0: int, r1: int, x: np.ndarray) -> np.ndarray:
        """y = x @ W[r0:r1]^T for rows [r0, r1) of `name`.weight's matrix view (one expert of a stacked
        [n_expert, rows, cols] tensor); same modes as linear. Pages out afterwards."""
        w = self.matrix(name + ".weight")
        if x.shape[-1] != w.cols:
            raise ValueError(f"{w.name}: input has {x.shape[-1]} features, weight has {w.cols} columns")
        if self.mode == "ggml" and w.type_name != "F32":
            from parity_both.reference.ggml_emul import ggml_linear  # noqa: PLC0415 - imports gguf

            row_bytes = self.info(w.name).nbytes // w.rows
            raw = w.raw()[r0 * row_bytes : r1 * row_bytes]
            y = np.asarray(
                ggml_linear(np.ascontiguousarray(x, dtype=np.float32), raw, w.type_name, r1 - r0, w.cols),
                dtype=np.float32,
            )
        else:
            y = x @ self.dense_rows(w.name, r0, r1, scratch=True).T
        self.release(w.name, r0, r1)
        return y

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
        self.gguf.close()
