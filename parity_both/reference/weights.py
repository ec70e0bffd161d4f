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
Every matrix that is not already F32 in the GGUF is stored (F32 ones are read in place), as
float32. (Storing fp16-exact ternary values as float16 halves the file but was measured 6x slower
per decode step: NumPy's float16 -> float32 conversion costs more than reading twice the bytes.)
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from parity_both.gguf.reader import GGUFFile, TensorInfo, read_gguf, sha256_file

MODES = ("exact", "ggml")

PREPARED_FORMAT = "parity-both-prepared-weights/1"
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
    """The tensors a prepared cache holds: every matrix not stored as F32 in the GGUF."""
    return [n for n, t in g.tensors.items() if len(t.shape) >= 2 and t.type_name not in _IN_PLACE]


def _iter_row_chunks(t: TensorInfo, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, int]]:
    rows, cols = t.rows_cols
    step = max(1, chunk_bytes // (4 * cols))
    if t.type_name == "I2_S":  # per-tensor scale at the end: one piece
        step = rows
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _write_blob(g: GGUFFile, out: BinaryIO) -> tuple[dict[str, dict[str, Any]], int]:
    """Dequantize every cached tensor of `g` into `out`, chunk by chunk; (entries, total bytes)."""
    entries: dict[str, dict[str, Any]] = {}
    offset = 0
    for name in cached_tensor_names(g):
        t = g.tensors[name]
        rows, cols = t.rows_cols
        chunks = list(_iter_row_chunks(t))
        dtype = "<f4"
        pad = (-offset) % _ALIGN
        out.write(b"\0" * pad)
        offset += pad
        entries[name] = {"offset": offset, "dtype": dtype, "rows": rows, "cols": cols, "source_type": t.type_name}
        for r0, r1 in chunks:
            b = np.ascontiguousarray(dequantize_rows(g, t, r0, r1), dtype=dtype)
            out.write(b.data)
            offset += b.nbytes
            del b
        g.release(name)
    out.flush()
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


def prepare_weights(
    model_path: str | Path, prepared_dir: str | Path, *, gguf: GGUFFile | None = None
) -> dict[str, Any]:
    """Dequantize every quantized matrix of a model once into `prepared_dir` and return the manifest.

    Deterministic (same model -> same bytes and manifest), atomic (written under temporary names,
    fsync'ed, manifest last), streaming (one chunk of one tensor in memory at a time). Reuses a
    valid existing cache (same file size, GGUF header and last MiB) without rewriting it.
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
            entries, nbytes = _write_blob(g, out)
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


def prepare_ephemeral(model_path: str | Path, g: GGUFFile) -> PreparedCache:
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
            entries, nbytes = _write_blob(g, out)
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

    def rows(self, name: str, r0: int, r1: int) -> np.ndarray:
        e = self.entries[name]
        dt = np.dtype(e["dtype"])
        cols = e["cols"]
        a = np.frombuffer(
            self._mm,
            dtype=dt,
            count=(r1 - r0) * cols,  # type: ignore[arg-type]
            offset=e["offset"] + r0 * cols * dt.itemsize,
        ).reshape(r1 - r0, cols)
        return a if dt == np.float32 else a.astype(np.float32)

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

    def dense_rows(self, name: str, r0: int, r1: int) -> np.ndarray:
        if self.cache is not None and name in self.cache.entries:
            return self.cache.rows(name, r0, r1)
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
        if self.mode == "ggml" and w.type_name != "F32":
            from parity_both.reference.ggml_emul import ggml_linear  # noqa: PLC0415 - imports gguf

            y = np.asarray(
                ggml_linear(np.ascontiguousarray(x, dtype=np.float32), w.raw(), w.type_name, w.rows, w.cols),
                dtype=np.float32,
            )
        else:
            step = max(1, CHUNK_BYTES // (4 * w.cols)) if w.name in _LM_HEADS else w.rows
            if step >= w.rows:
                y = x @ w.dense_rows(0, w.rows).T
            else:
                y = np.empty((x.shape[0], w.rows), dtype=np.float32)
                for r0 in range(0, w.rows, step):
                    r1 = min(w.rows, r0 + step)
                    np.matmul(x, w.dense_rows(r0, r1).T, out=y[:, r0:r1])
                    w.release()
        w.release()
        return y

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
            y = x @ w.dense_rows(r0, r1).T
        self.release(w.name, r0, r1)
        return y

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
        self.gguf.close()
