"""Weights for the reference: per-tensor streaming access (`Weight`, `WeightStore.linear`); dequantization lives in
dequant.py and the prepared-weights cache in prepared.py.

Nothing here holds the whole model in memory. Every matrix is reached through a `Weight` handle
that dequantizes it (or a block of its rows) on demand from the memory-mapped GGUF, or reads it
from a *prepared-weights cache*: one file of already-dequantized values, memory-mapped and paged
out again (madvise DONTNEED) as soon as a tensor has been used, except a bounded resident set
(the LM head first; an F16/BF16 LM head read in place is held as one float32 copy when it is at most
prepared.HELD_HEAD_BYTES). Peak memory is therefore about the resident set plus one layer plus one
chunk of the LM head, whatever the model size.

Threads: with n > 1 BLAS threads (blas.take_row_workers), each matmul's output rows are shared out to
n threads in contiguous groups of blocks, each thread expanding its own blocks (int8 -> float32, F16 ->
float32) and making its own one-thread BLAS calls: the expansion, not only the BLAS call, runs in
parallel. A ternary matrix with one scale per tensor (I2_S), W = d C, is multiplied as (x d) C^T, its
codes expanded by a plain int8 -> float32 cast (half the cost of cast-and-multiply).

Dequantization: fast NumPy code for F32/F16/BF16/Q4_0/Q4_1/Q8_0/TQ2_0 (bit-identical to
`gguf.quants.dequantize`) and I2_S (bit-identical to `parity_both.gguf.quants`), asserted in tests;
every other type through `parity_both.gguf.quants` (gguf.quants plus Q8_1/Q1_0), imported lazily
because gguf costs ~0.15 s to import.

Prepared cache layout (directory `prepared_dir`, written by `prepare_weights`, deterministic;
`prepare_ephemeral` writes the same blob to an anonymous in-memory file for a single run):
    manifest.json   model identity (size, sha256, quick fingerprint), the GGUF header without its
                    arrays (so a warm run need not parse the tokenizer), per-tensor offset/dtype
    weights.bin     concatenated little-endian arrays, each 4096-byte aligned
Every matrix that is not a float type in the GGUF is stored (F32 ones are read in place; F16 and BF16
ones are converted exactly from the GGUF at each use, per matrix or LM-head chunk, into a reused
buffer, by dequant.FLOAT_CONVERT: slower than reading a float32 copy, see prepared._IN_PLACE): ternary
ones (TQ1_0, TQ2_0, I2_S) as int8 codes plus float32 scales (1 byte per weight: the cache scales
with the file, not with float32), turned back into float32 per matrix (or LM-head chunk) at matmul
time by the same single float32 multiply `q * d` the dequantizers do, so values are bit-identical
(or, for one scale per tensor, cast alone, the scale folded into x as above);
every other type as float32, within a disk budget (`budget_bytes`, default BUDGET_FACTOR x the
model file): matrices beyond it are dequantized from the GGUF at each use instead.
(Storing fp16-exact ternary values as float16 halves the float32 file but was measured 6x slower
per decode step: NumPy's float16 -> float32 astype costs more than reading twice the bytes;
int8 -> float32 with a scale costs ~25 ms for a 6912 x 2560 matrix, dequantizing TQ2_0 ~550 ms.)
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from parity_both.gguf.reader import GGUFFile, TensorInfo
from parity_both.reference.dequant import FLOAT_CONVERT, dequantize, dequantize_rows, i2_s_codes, i2_s_scale
from parity_both.reference.prepared import _LM_HEADS, CHUNK_BYTES, PreparedCache

# Decode steps (x with at most SMALL_BATCH rows) multiply expanded matrices in row blocks of this many
# float32 bytes: small enough to stay in the CPU cache between the expansion and the matmul. On several
# threads, blocks of DECODE_CHUNK_BYTES_THREADED: each block's Python holds the GIL the other threads wait
# for, and 1 MiB blocks were slower on two threads than on one (2B-4T fixture, decode: 0.23 vs 0.14 ns a
# weight at 4 MiB). The block size decides BLAS's kernel shapes, hence float32 rounding: one-thread runs
# keep 1 MiB, so their logits do not move.
SMALL_BATCH = 8
DECODE_CHUNK_BYTES = 1 << 20
DECODE_CHUNK_BYTES_THREADED = 4 << 20

MODES = ("exact", "ggml")

PROGRESS_S = 5.0  # at most one progress line per this many seconds


# --------------------------------------------------------------------------------------------
# Per-tensor access
# --------------------------------------------------------------------------------------------
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

    def __init__(self, g: GGUFFile, cache: PreparedCache | None = None, mode: str = "exact", threads: int = 1):
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
        # threads > 1: each matmul's output rows in `threads` groups of blocks, side by side (each thread
        # expands its own blocks into its own scratch buffer and makes its own one-thread BLAS calls)
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(self.threads - 1) if self.threads > 1 else None
        self._local = threading.local()
        self._scales: dict[str, np.float32 | None] = {}
        self._held_f32: dict[str, np.ndarray] = {}

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

    def tensor_scale(self, name: str) -> np.float32 | None:
        """The one finite, non-zero scale of a ternary matrix scaled per tensor (I2_S), else None."""
        if name not in self._scales:
            if self.cache is not None and name in self.cache.entries:
                d = self.cache.tensor_scale(name)
            else:
                t = self.info(name)
                d = i2_s_scale(self.gguf.raw(name), t.n_elements) if t.type_name == "I2_S" else None
            self._scales[name] = d if d is not None and np.isfinite(d) and d != 0 else None
        return self._scales[name]

    def dense_rows(self, name: str, r0: int, r1: int, *, scratch: bool = False, unscaled: bool = False) -> np.ndarray:
        """Rows [r0, r1) as float32. scratch=True: int8-cached and F16/BF16 matrices are expanded into one
        buffer reused by the next such call (for a result consumed at once, as in linear). unscaled=True
        (matrices with a tensor_scale): the ternary codes -1 / 0 / +1 without the scale."""
        if self.cache is not None and name in self.cache.entries:
            e = self.cache.entries[name]
            out = self._scratch_rows(r1 - r0, e["cols"]) if scratch and e["dtype"] == "|i1" else None
            return self.cache.rows(name, r0, r1, out, unscaled=unscaled)
        held = self._held(name)
        if held is not None:
            return held[r0:r1]
        t = self.info(name)
        cols = t.rows_cols[1]
        if unscaled:
            return i2_s_codes(self.gguf.raw(name), t.n_elements).reshape(-1, cols)[r0:r1]
        if t.type_name == "F32":
            return self.gguf.raw(name)[r0 * cols * 4 : r1 * cols * 4].view(np.float32).reshape(r1 - r0, cols)
        out = self._scratch_rows(r1 - r0, cols) if scratch and t.type_name in FLOAT_CONVERT else None
        return dequantize_rows(self.gguf, t, r0, r1, out)

    def _held(self, name: str) -> np.ndarray | None:
        """The float32 copy of an F16/BF16 matrix the cache has this store hold (held_in_place), made
        at its first use (row halves converted side by side on `threads` threads); else None."""
        if self.cache is None or name not in self.cache.held_in_place or self.info(name).type_name == "F32":
            return None
        held = self._held_f32.get(name)
        if held is None:
            t = self.info(name)
            rows, cols = t.rows_cols
            held = np.empty((rows, cols), dtype=np.float32)
            step = max(1, DECODE_CHUNK_BYTES // (4 * cols))

            def convert(part: tuple[int, int]) -> None:  # the source pages go as soon as they are read
                for r0 in range(part[0], part[1], step):
                    r1 = min(part[1], r0 + step)
                    dequantize_rows(self.gguf, t, r0, r1, held[r0:r1])
                    self.gguf.release(name, r0, r1)

            half = -(-rows // self.threads)
            parts = [(r0, min(rows, r0 + half)) for r0 in range(0, rows, half)]
            self._side_by_side(convert, parts)
            self._held_f32[name] = held
        return held

    def _scratch_rows(self, n_rows: int, cols: int) -> np.ndarray:
        """A float32 [n_rows, cols] view of the one reused scratch buffer (grown when needed)."""
        n = n_rows * cols
        buf = getattr(self._local, "scratch", None)
        if buf is None or buf.size < n:
            buf = self._local.scratch = np.empty(n, dtype=np.float32)
        return buf[:n].reshape(n_rows, cols)

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
        elif self.cache is None or name not in self.cache.held_in_place:
            self.gguf.release(name, r0, r1)

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
            y = self._exact_linear(w, x)
        w.release()
        return y

    def _exact_linear(self, w: Weight, x: np.ndarray) -> np.ndarray:
        """x @ W^T in float32. An LM head goes in CHUNK_BYTES row blocks (paged out after each); a few
        rows of x (decode steps) times an expanded matrix (int8 codes, F16/BF16, other quantized types) go
        in cache-sized row blocks, so the float32 rows are used while still in cache instead of being
        written to and read back from memory whole (2B-4T fixture, 8 decode steps: 15.1 -> 8.7 s). Each
        output is the same float32 dot product; BLAS picks its kernel by shape, so values agree to float32
        rounding, not bit for bit, with the whole-matrix product (2B-4T logits: max |diff| 2.9e-5).
        With threads > 1 the blocks (a whole matrix: one block per thread) are shared out in contiguous
        groups, one per thread."""
        self._held(w.name)  # made here, before the threads share the blocks out (it shares out its own work)
        step = self._row_step(w, x)
        d = self.tensor_scale(w.name)
        if d is not None:  # W = d C (C: -1/0/+1 codes): (x d) C^T, expanding C by a plain int8 -> float32 cast
            x = x * d
        if step >= w.rows and self._pool is None:
            return x @ self.dense_rows(w.name, 0, w.rows, scratch=True, unscaled=d is not None).T
        y = np.empty((x.shape[0], w.rows), dtype=np.float32)
        blocks = [(r0, min(w.rows, r0 + step)) for r0 in range(0, w.rows, step)]

        block = self._block_source(w.name, d is not None)
        # threaded prompts: W x^T, the weight block as BLAS's left operand (measured 16% faster than x W^T
        # for 40 x 2560 by 6912 x 2560 on one thread); one-thread runs keep x W^T, their rounding unchanged
        xt = np.ascontiguousarray(x.T) if self._pool is not None and x.shape[0] > SMALL_BATCH else None

        def run(group: list[tuple[int, int]]) -> None:
            for r0, r1 in group:
                if xt is None:
                    np.matmul(x, block(r0, r1).T, out=y[:, r0:r1])
                else:
                    y[:, r0:r1] = (block(r0, r1) @ xt).T
                if w.name in _LM_HEADS:
                    self.release(w.name, r0, r1)

        n = -(-len(blocks) // self.threads)
        self._side_by_side(run, [blocks[i : i + n] for i in range(0, len(blocks), n)])
        return y

    def _block_source(self, name: str, unscaled: bool) -> Callable[[int, int], np.ndarray]:
        """(r0, r1) -> rows [r0, r1) of `name` as float32 in this thread's scratch buffer (or a view):
        dense_rows, or for int8 codes without their scale a cast from one view of the map (the least
        Python per block: with two threads, each block's Python holds the GIL the other waits for)."""
        if unscaled and self.cache is not None and name in self.cache.entries:
            codes = self.cache.codes(name)

            def cast(r0: int, r1: int) -> np.ndarray:
                out = self._scratch_rows(r1 - r0, codes.shape[1])
                np.copyto(out, codes[r0:r1])
                return out

            return cast
        return lambda r0, r1: self.dense_rows(name, r0, r1, scratch=True, unscaled=unscaled)

    def _side_by_side(self, fn: Callable[[Any], None], parts: list[Any]) -> None:
        """fn(part) for every part: the first in this thread, the others on the pool's threads."""
        futures = [self._pool.submit(fn, p) for p in parts[1:]] if self._pool is not None else []
        for p in parts[: 1 if self._pool is not None else len(parts)]:
            fn(p)
        for f in futures:
            f.result()

    def _row_step(self, w: Weight, x: np.ndarray) -> int:
        """Rows per block: one thread keeps the blocks it always had (an LM head in CHUNK_BYTES, even in
        decode steps); threaded decode steps take DECODE_CHUNK_BYTES_THREADED blocks, LM head included."""
        if w.name in _LM_HEADS and self.threads == 1:
            return max(1, CHUNK_BYTES // (4 * w.cols))
        if x.shape[0] <= SMALL_BATCH and self._expanded(w.name):
            return max(1, (DECODE_CHUNK_BYTES if self.threads == 1 else DECODE_CHUNK_BYTES_THREADED) // (4 * w.cols))
        if w.name in _LM_HEADS:
            return max(1, CHUNK_BYTES // (4 * w.cols))
        return -(-w.rows // self.threads)

    def _expanded(self, name: str) -> bool:
        """True when the matrix's float32 values are computed at each use (not a view of stored floats)."""
        if self.cache is not None and name in self.cache.entries:
            return self.cache.entries[name]["dtype"] != "<f4"
        return self.info(name).type_name != "F32" and (self.cache is None or name not in self.cache.held_in_place)

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
        if self._pool is not None:
            self._pool.shutdown()
        if self.cache is not None:
            self.cache.close()
        self.gguf.close()
