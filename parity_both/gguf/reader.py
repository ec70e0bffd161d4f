"""A small, tolerant GGUF reader.

gguf-py's GGUFReader refuses tensor type ids it does not know (BitNet.cpp's I2_S is 36), and the
ids 36-40 mean different things in mainline ggml and in BitNet.cpp's fork. This reader parses the
header with the project's one parser (gguf/lowlevel.py, shared with the parse-time peek and the
writer's raw key copy), decides the numbering from the file's architecture, and exposes every tensor
as a memory-mapped byte view so weights can be read one layer at a time.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from parity_both.gguf.constants import (  # noqa: F401 - BITNET_FORK_ARCHS, GGUF_MAGIC, tables re-exported
    BITNET_FORK_ARCHS,
    BITNET_TYPES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    MAINLINE_TYPES,
    VT_ARRAY,
    VT_STRING,
)
from parity_both.gguf.lowlevel import (
    GGUFError,
    align,
    check_alignment,
    iter_keys,
    iter_tensor_infos,
    read_array_header,
    read_header,
    read_strings,
    read_value,
    skip_value,
    tensor_nbytes,
)
from parity_both.hashing import sha256_file  # noqa: F401  (re-exported for callers)

DEFAULT_ALIGNMENT = GGUF_DEFAULT_ALIGNMENT


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: ne[0] (row length) first
    type_id: int
    type_name: str
    offset: int  # absolute offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def rows_cols(self) -> tuple[int, int]:
        """(rows, row length) of the matrix view: ne[1..] flattened x ne[0]."""
        return self.n_elements // self.shape[0], self.shape[0]


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    alignment: int
    data_offset: int
    type_numbering: str  # "mainline" or "bitnet.cpp"
    type_numbering_reason: str
    _mm: mmap.mmap | None = field(default=None, repr=False)

    # -- data access -------------------------------------------------------------------------
    def _map(self) -> mmap.mmap:
        if self._mm is None:
            with open(self.path, "rb") as fh:
                self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the memory-mapped file."""
        t = self.tensors[name]
        return np.frombuffer(self._map(), dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def release(self, name: str, r0: int | None = None, r1: int | None = None) -> None:
        """Tell the kernel we are done with a tensor's pages (or those of its rows [r0, r1)) so they leave
        our RSS."""
        if self._mm is None:
            return
        t = self.tensors[name]
        rows = t.rows_cols[0]
        row_bytes = t.nbytes // rows
        begin = t.offset + (r0 or 0) * row_bytes
        end = t.offset + (rows if r1 is None else r1) * row_bytes
        start = (begin // mmap.PAGESIZE) * mmap.PAGESIZE
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (AttributeError, OSError, ValueError):
            pass

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # views still alive; the map goes when they do
                pass
            self._mm = None

    # -- convenience -------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_key(self, suffix: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{suffix}", default)

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            counts[t.type_name] = counts.get(t.type_name, 0) + 1
        return dict(sorted(counts.items()))


def decide_type_numbering(metadata: Mapping[str, Any], type_ids: set[int]) -> tuple[str, str]:
    """Which meaning the colliding tensor type ids 36-40 have in this file, and why."""
    arch = str(metadata.get("general.architecture", ""))
    if arch in BITNET_FORK_ARCHS:
        return "bitnet.cpp", f"general.architecture={arch!r} is only written by BitNet.cpp's fork"
    if 36 in type_ids:
        return "bitnet.cpp", "tensor type 36 is retired in mainline ggml; only BitNet.cpp writes it (I2_S)"
    if 37 in type_ids or 38 in type_ids:
        return "bitnet.cpp", "tensor types 37/38 are retired in mainline ggml; only BitNet.cpp writes them"
    return "mainline", f"general.architecture={arch!r} and no BitNet.cpp-only tensor type"


RawInfo = tuple[str, tuple[int, ...], int, int]


def _parse(path: Path) -> tuple[int, dict[str, Any], list[RawInfo], int, int]:
    """(version, metadata, raw tensor infos, alignment, data offset) of a GGUF file."""
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise GGUFError(f"cannot open model {path}: {e.strerror}") from e
    with fh:
        version, n_tensors, n_kv = read_header(fh, path)
        metadata = {key: read_value(fh, vtype) for key, vtype in iter_keys(fh, n_kv)}
        try:
            raw_infos = list(iter_tensor_infos(fh, n_tensors))
        except GGUFError as e:
            raise GGUFError(f"{path}: {e}") from None
        alignment = check_alignment(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        return version, metadata, raw_infos, alignment, align(fh.tell(), alignment)


def _tensor_table(
    path: Path, raw_infos: list[RawInfo], data_offset: int, numbering: str, reason: str, alignment: int
) -> dict[str, TensorInfo]:
    table = BITNET_TYPES if numbering == "bitnet.cpp" else MAINLINE_TYPES
    file_size = path.stat().st_size
    tensors: dict[str, TensorInfo] = {}
    for name, shape, type_id, offset in raw_infos:
        if type_id not in table:
            raise GGUFError(
                f"{path}: tensor {name!r} has type id {type_id}, unknown under {numbering} numbering "
                f"({reason}); convert the model to a standard ggml type"
            )
        if name in tensors:
            raise GGUFError(f"{path}: corrupt GGUF: tensor {name!r} appears twice in the tensor table")
        n_el = math.prod(shape)  # Python ints: a lying shape cannot wrap around
        if n_el > file_size * 8:  # no ggml type stores fewer than one bit per value
            raise GGUFError(f"{path}: corrupt GGUF: tensor {name!r} has an impossible shape {list(shape)}")
        if offset % alignment:
            raise GGUFError(f"{path}: corrupt GGUF: tensor {name!r} offset {offset} is not {alignment}-aligned")
        nbytes = tensor_nbytes(table[type_id][0], n_el)
        start = data_offset + offset
        if start + nbytes > file_size:
            raise GGUFError(
                f"{path}: truncated GGUF: tensor {name!r} needs bytes up to {start + nbytes}, "
                f"file has {file_size}; re-download or re-convert the model"
            )
        tensors[name] = TensorInfo(name, shape, type_id, table[type_id][0], start, nbytes)
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
    for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise GGUFError(f"{path}: corrupt GGUF: tensors {a!r} and {b!r} overlap; re-convert the model")
    return tensors


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF header, metadata and tensor table (tensor data stays on disk, memory-mapped)."""
    path = Path(path)
    version, metadata, raw_infos, alignment, data_offset = _parse(path)
    numbering, reason = decide_type_numbering(metadata, {t[2] for t in raw_infos})
    tensors = _tensor_table(path, raw_infos, data_offset, numbering, reason, alignment)
    return GGUFFile(path, version, metadata, tensors, alignment, data_offset, numbering, reason)


def read_string_array_bytes(path: str | Path, key: str) -> list[bytes]:
    """The raw bytes of each string of a string-array key (e.g. tokenizer.ggml.tokens), undecoded:
    read_gguf decodes strings with errors='replace'. [] when the file has no such key."""
    with open(path, "rb") as fh:
        _version, _n_tensors, n_kv = read_header(fh, path)
        for k, vtype in iter_keys(fh, n_kv):
            if k != key:
                skip_value(fh, vtype)
                continue
            itype, n = read_array_header(fh) if vtype == VT_ARRAY else (None, 0)
            if itype != VT_STRING:
                raise GGUFError(f"{path}: {key} is not an array of strings (value type {vtype})")
            return read_strings(fh, n, keep="bytes")
    return []
