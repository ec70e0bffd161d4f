"""The prepared-weights cache of the reference (see weights.py for the layout and why)."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from parity_both.gguf.reader import GGUFFile, TensorInfo, read_gguf, sha256_file
from parity_both.progress import Progress
from parity_both.reference.dequant import _f16_col, dequantize_rows
from parity_both.reference.hparams import lm_head_tensor

PREPARED_FORMAT = "parity-both-prepared-weights/3"
# Default disk budget of a prepared cache, as a multiple of the model file's size.
BUDGET_FACTOR = 4.0
# Ternary types cached as int8 codes + float32 scales: type -> (block elements, block bytes, offset
# of the fp16 block scale) or None for I2_S (one float32 scale after the packed codes).
TERNARY_BLOCKS: dict[str, tuple[int, int, int] | None] = {"TQ1_0": (256, 54, 52), "TQ2_0": (256, 66, 64), "I2_S": None}
_ALIGN = 4096
# Upper bound for one dense block of a matrix (bytes of float32): the LM head is processed in
# row chunks of at most this size so it never sits in memory whole.
CHUNK_BYTES = 32 << 20
# Weight pages kept mapped between uses (the rest is paged out after each use): at most half the model
# file + RESIDENT_EXTRA, the LM head first (the RSS bound for big ternary models is file size * 1.5 +
# 200 MiB). Measured on SmolLM2 (16 decode steps): resident 0 / 147 / 538 MiB -> decode 1.6 / 1.44 /
# 1.17 s, peak RSS 96 / 215 / 582 MiB; on the 2B-4T fixture (8 decode steps, 2 threads) re-faulting
# every page costs ~0.3 s a step (~0.11 s per GB).
RESIDENT_EXTRA = 100 << 20
# An F16/BF16 LM head read in place (a tied embedding) of at most this many float32 bytes is converted once
# per run and held as float32 in memory (the 2B-4T head, 128256 x 2560: 1.31 GB, peak RSS ~1.5 GB for a
# 1.19 GB file): converting it at every step costs ~0.1 s a step on 2 threads (8 decode steps: ~0.7 s).
# An F32 one read in place keeps its pages mapped when it fits in the resident budget.
HELD_HEAD_BYTES = 3 << 29
_LM_HEADS = ("output.weight", "token_embd.weight")
# Types read in place from the GGUF (no cache entry): F32 as is, F16 and BF16 converted exactly at each use
# (dequant.FLOAT_CONVERT): a float32 copy would double or triple the model on disk (the 2B-4T F16 embedding:
# 1.2 GB). The price, measured on that embedding as LM head: one pass ~0.9-1.0 s instead of ~0.4-0.5 s
# (1 token, 2 busy cores; the conversion itself is ~0.5 ns a weight, the rest re-faulting the file's pages).
_IN_PLACE = ("F32", "F16", "BF16")


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
    """The tensors a prepared cache may hold: every matrix not stored as a float type in the GGUF."""
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
    for stale in (*prepared_dir.glob(".weights.*.tmp"), *prepared_dir.glob(".manifest.*.tmp")):
        stale.unlink(missing_ok=True)  # a writer killed mid-write (SIGKILL runs no cleanup); one job owns the dir
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
        if resident_bytes is None:
            resident_bytes = manifest["model"]["size"] // 2 + RESIDENT_EXTRA
        # the LM head first (cached, or read in place from the GGUF: then the store holds it, see
        # held_in_place), then the cached tensors in file order. gemma2 always multiplies by token_embd:
        # with an output.weight in the file the wrong matrix would be kept (speed and memory only)
        table = {r[0]: r for r in manifest.get("gguf", {}).get("tensors", [])}
        head = lm_head_tensor(table)
        self.held_in_place: set[str] = set()
        budget = resident_bytes
        if head in table and head not in self.entries and table[head][3] in _IN_PLACE:
            n_float32 = 4 * int(np.prod(table[head][1]))
            if table[head][3] != "F32" and n_float32 <= HELD_HEAD_BYTES:
                self.held_in_place.add(head)
                budget = max(0, budget - n_float32)
            elif table[head][5] <= budget:
                self.held_in_place.add(head)
                budget -= table[head][5]
        order = sorted(self.entries, key=lambda n: (n != head, self.entries[n]["offset"]))
        self.resident: set[str] = set()
        for name in order:
            e = self.entries[name]
            size = e["rows"] * e["cols"] * np.dtype(e["dtype"]).itemsize
            if size <= budget:
                self.resident.add(name)
                budget -= size

    def tensor_scale(self, name: str) -> np.float32 | None:
        """The one scale of an int8 entry with a per-tensor scale (from I2_S), else None."""
        e = self.entries[name]
        if e["dtype"] != "|i1" or e["scales_shape"] != [1]:
            return None
        return np.frombuffer(self._mm, dtype="<f4", count=1, offset=e["scales_offset"])[0]  # type: ignore[arg-type]

    def codes(self, name: str) -> np.ndarray:
        """The int8 codes [rows, cols] of an int8 entry: a view of the map."""
        e = self.entries[name]
        n = e["rows"] * e["cols"]
        return np.frombuffer(self._mm, dtype=np.int8, count=n, offset=e["offset"]).reshape(e["rows"], e["cols"])  # type: ignore[arg-type]

    def rows(self, name: str, r0: int, r1: int, out: np.ndarray | None = None, *, unscaled: bool = False) -> np.ndarray:
        """Rows [r0, r1) as float32: a view of the map (float32 entries) or expanded from int8
        codes (into `out` when given); unscaled=True: the codes alone (entries with tensor_scale)."""
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
        if unscaled:
            out = np.empty(a.shape, dtype=np.float32) if out is None else out
            np.copyto(out, a)
            return out
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
