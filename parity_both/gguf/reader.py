"""A small, tolerant GGUF reader.

gguf-py's GGUFReader refuses tensor type ids it does not know (BitNet.cpp's I2_S is 36), and the
ids 36-40 mean different things in mainline ggml and in BitNet.cpp's fork. This reader parses the
header itself, decides the numbering from the file's architecture, and exposes every tensor as a
memory-mapped byte view so weights can be read one layer at a time.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

DEFAULT_ALIGNMENT = 32

from parity_both.gguf.constants import BITNET_FORK_ARCHS  # noqa: E402,F401 - re-exported
from parity_both.gguf.peek import _ARRAY, _SCALARS, _STRING, GGUF_MAGIC, GGUFError, _read_exact, _read_string  # noqa: E402,F401

_NP_SCALARS: dict[int, str] = {
    0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
    10: "<u8", 11: "<i8", 12: "<f8",
}

# Mainline ggml tensor types: id -> (name, block elements, block bytes).
MAINLINE_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4),
    27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}
# BitNet.cpp's fork reuses 36-39. Only I2_S has a layout we can read (see formats notes); the
# others are named so the refusal message can say what the tensor is.
BITNET_TYPES: dict[int, tuple[str, int, int]] = {
    **{k: v for k, v in MAINLINE_TYPES.items() if k < 36},
    36: ("I2_S", 4, 1),  # 4 ternary codes per byte; + 32 trailing bytes per tensor (scale, pad)
    37: ("I8_S", 1, 1),
    38: ("TL1", 0, 0),
    39: ("TL2", 0, 0),
}
# Architecture names only BitNet.cpp's fork / Microsoft's published GGUFs use.

from parity_both.hashing import sha256_file  # noqa: E402,F401  (re-exported for callers)


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

    def release(self, name: str) -> None:
        """Tell the kernel we are done with a tensor's pages so they leave our RSS."""
        if self._mm is None:
            return
        t = self.tensors[name]
        start = (t.offset // mmap.PAGESIZE) * mmap.PAGESIZE
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, start, t.offset + t.nbytes - start)
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


def _read_value(fh: BinaryIO, vtype: int) -> Any:
    if vtype in _SCALARS:
        fmt, size = _SCALARS[vtype]
        return struct.unpack(fmt, _read_exact(fh, size, "a metadata value"))[0]
    if vtype == _STRING:
        return _read_string(fh)
    if vtype == _ARRAY:
        (itype,) = struct.unpack("<I", _read_exact(fh, 4, "an array type"))
        (n,) = struct.unpack("<Q", _read_exact(fh, 8, "an array length"))
        if n > 1 << 31:
            raise GGUFError(f"corrupt GGUF: array length {n} is implausible")
        if itype in _NP_SCALARS:
            dt = np.dtype(_NP_SCALARS[itype])
            arr = np.frombuffer(_read_exact(fh, dt.itemsize * n, "an array"), dtype=dt)
            return [bool(x) for x in arr] if itype == 7 else arr.tolist()
        return [_read_value(fh, itype) for _ in range(n)]
    raise GGUFError(f"corrupt GGUF: unknown metadata value type {vtype}")


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


def tensor_nbytes(type_id: int, n_elements: int, table: Mapping[int, tuple[str, int, int]]) -> int:
    name, blk, size = table[type_id]
    if name == "I2_S":
        return n_elements // 4 + 32
    if blk == 0:
        raise GGUFError(f"tensor type {name} has no fixed layout this tool can read")
    if n_elements % blk:
        raise GGUFError(f"corrupt GGUF: {n_elements} elements is not a multiple of the {name} block")
    return n_elements // blk * size


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF header, metadata and tensor table (tensor data stays on disk, memory-mapped)."""
    path = Path(path)
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise GGUFError(f"cannot open model {path}: {e.strerror}") from e
    with fh:
        if _read_exact(fh, 4, "the magic") != GGUF_MAGIC:
            raise GGUFError(f"{path} is not a GGUF file (bad magic); point --model-gguf at a .gguf model")
        (version,) = struct.unpack("<I", _read_exact(fh, 4, "the version"))
        if version not in (2, 3):
            raise GGUFError(f"{path}: GGUF version {version} is not supported (expected 2 or 3)")
        n_tensors, n_kv = struct.unpack("<QQ", _read_exact(fh, 16, "the header"))
        if n_tensors > 1 << 24 or n_kv > 1 << 24:
            raise GGUFError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = _read_string(fh)
            (vtype,) = struct.unpack("<I", _read_exact(fh, 4, "a value type"))
            metadata[key] = _read_value(fh, vtype)
        raw_infos = []
        for _ in range(n_tensors):
            name = _read_string(fh)
            (n_dims,) = struct.unpack("<I", _read_exact(fh, 4, "tensor dims"))
            if n_dims > 8:
                raise GGUFError(f"{path}: corrupt tensor info for {name!r} ({n_dims} dims)")
            shape = struct.unpack(f"<{n_dims}Q", _read_exact(fh, 8 * n_dims, "tensor shape"))
            type_id, offset = struct.unpack("<IQ", _read_exact(fh, 12, "tensor type/offset"))
            raw_infos.append((name, tuple(int(s) for s in shape), type_id, offset))
        alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        pos = fh.tell()
        data_offset = (pos + alignment - 1) // alignment * alignment
        file_size = path.stat().st_size

    numbering, reason = decide_type_numbering(metadata, {t[2] for t in raw_infos})
    table = BITNET_TYPES if numbering == "bitnet.cpp" else MAINLINE_TYPES
    tensors: dict[str, TensorInfo] = {}
    for name, shape, type_id, offset in raw_infos:
        if type_id not in table:
            raise GGUFError(
                f"{path}: tensor {name!r} has type id {type_id}, unknown under {numbering} numbering "
                f"({reason}); convert the model to a standard ggml type"
            )
        n_el = int(np.prod(shape, dtype=np.int64)) if shape else 1
        nbytes = tensor_nbytes(type_id, n_el, table)
        start = data_offset + offset
        if start + nbytes > file_size:
            raise GGUFError(
                f"{path}: truncated GGUF: tensor {name!r} needs bytes up to {start + nbytes}, "
                f"file has {file_size}; re-download or re-convert the model"
            )
        tensors[name] = TensorInfo(name, shape, type_id, table[type_id][0], start, nbytes)
    return GGUFFile(path, version, metadata, tensors, alignment, data_offset, numbering, reason)



