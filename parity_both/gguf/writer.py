"""The one GGUF writer: a small streaming writer (gguf-py's cannot emit BitNet.cpp's type 36, nor copy
metadata values byte for byte).

Metadata is handled as ``RawKV`` (key, value type, encoded bytes) so copies are byte-exact; tensors as
``TensorSpec`` whose ``produce`` is called once, in file order, while writing, so memory stays flat.
Files are written to a temporary file in the target directory and moved into place at the end: a
failure or a killed job never leaves a half-written file under the target name.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

from parity_both.gguf.constants import (
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    TYPE_IDS,
    VALUE_SCALARS,
    VT_ARRAY,
    VT_BOOL,
    VT_FLOAT32,
    VT_STRING,
    VT_UINT32,
)
from parity_both.gguf.lowlevel import iter_keys, read_header, read_value_raw, tensor_nbytes

__all__ = [
    "ALIGNMENT",
    "TYPE_IDS",
    "RawKV",
    "TensorSpec",
    "Written",
    "kv_bool",
    "kv_f32",
    "kv_str",
    "kv_u32",
    "raw_kv_array_len",
    "raw_kv_scalar",
    "raw_kv_str",
    "read_raw_kvs",
    "tensor_nbytes",
    "write_gguf",
]

ALIGNMENT = GGUF_DEFAULT_ALIGNMENT


@dataclass(frozen=True)
class RawKV:
    key: str
    vtype: int
    value: bytes  # the encoded value exactly as it sits in a GGUF file (after the type field)


def read_raw_kvs(path: str | Path) -> list[RawKV]:
    """Every metadata key of a GGUF with its encoded value, in file order."""
    with open(path, "rb") as fh:
        _version, _n_tensors, n_kv = read_header(fh, path)
        return [RawKV(key, vtype, read_value_raw(fh, vtype)) for key, vtype in iter_keys(fh, n_kv)]


def _str_bytes(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def kv_str(key: str, v: str) -> RawKV:
    return RawKV(key, VT_STRING, _str_bytes(v))


def kv_u32(key: str, v: int) -> RawKV:
    return RawKV(key, VT_UINT32, struct.pack("<I", v))


def kv_f32(key: str, v: float) -> RawKV:
    return RawKV(key, VT_FLOAT32, struct.pack("<f", v))


def kv_bool(key: str, v: bool) -> RawKV:
    return RawKV(key, VT_BOOL, struct.pack("<?", v))


def raw_kv_array_len(kv: RawKV) -> int:
    if kv.vtype != VT_ARRAY:
        raise ValueError(f"{kv.key} is not an array")
    return struct.unpack_from("<IQ", kv.value, 0)[1]


def raw_kv_str(kv: RawKV) -> str:
    if kv.vtype != VT_STRING:
        raise ValueError(f"{kv.key} is not a string")
    return kv.value[8:].decode("utf-8")


def raw_kv_scalar(kv: RawKV) -> int | float | bool:
    if kv.vtype not in VALUE_SCALARS:
        raise ValueError(f"{kv.key} is not a scalar (value type {kv.vtype})")
    return struct.unpack(VALUE_SCALARS[kv.vtype][0], kv.value)[0]


@dataclass
class TensorSpec:
    name: str
    ne: tuple[int, ...]  # ggml order: row length first
    type_name: str
    # called once, in file order, while writing; returns the bytes, or an iterable of byte chunks so a
    # large tensor never has to sit in memory whole
    produce: Callable[[], bytes | Iterable[bytes]]
    type_id: int | None = None  # defaults to TYPE_IDS[type_name]
    size: int | None = None  # byte count when copied from another file (else from the type)

    @property
    def n_elements(self) -> int:
        n = 1
        for s in self.ne:
            n *= int(s)
        return n

    @property
    def nbytes(self) -> int:
        if self.size is not None:
            return self.size
        return tensor_nbytes(self.type_name, self.n_elements)


class Written(NamedTuple):
    sha256: str
    bytes: int


class _HashingFile:
    """Write-through to a file, hashing what goes by (the sha256 costs no second read)."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.h, self.n = fh, hashlib.sha256(), 0

    def write(self, b: bytes | memoryview) -> int:
        self.h.update(b)
        n = self.fh.write(b)
        self.n += n
        return n

    def pad(self, alignment: int) -> None:
        self.write(b"\0" * ((-self.n) % alignment))


def _write_header(out: _HashingFile, kvs: list[RawKV], tensors: list[TensorSpec], alignment: int) -> None:
    out.write(GGUF_MAGIC + struct.pack("<IQQ", 3, len(tensors), len(kvs)))
    for kv in kvs:
        out.write(_str_bytes(kv.key) + struct.pack("<I", kv.vtype) + kv.value)
    offset = 0
    for t in tensors:
        tid = TYPE_IDS[t.type_name] if t.type_id is None else t.type_id
        rec = _str_bytes(t.name) + struct.pack("<I", len(t.ne)) + struct.pack(f"<{len(t.ne)}Q", *t.ne)
        out.write(rec + struct.pack("<IQ", tid, offset))
        offset += t.nbytes + (-t.nbytes) % alignment
    out.pad(alignment)


def _write_tensor(out: _HashingFile, t: TensorSpec, alignment: int) -> None:
    data = t.produce()
    chunks = [data] if isinstance(data, bytes | bytearray | memoryview) else data
    n = 0
    for chunk in chunks:
        n += out.write(chunk)
    if n != t.nbytes:
        raise AssertionError(f"{t.name}: produced {n} bytes, expected {t.nbytes}")
    out.pad(alignment)


def write_gguf(
    path: str | Path, kvs: Iterable[RawKV], tensors: list[TensorSpec], alignment: int = ALIGNMENT
) -> Written:
    """Write a GGUF v3 file (header, metadata, tensor table, then each tensor aligned) atomically;
    return its sha256 and size. ``alignment`` must match any general.alignment key in ``kvs``."""
    kvs = list(kvs)
    keys = [kv.key for kv in kvs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate metadata keys")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with open(tmp, "wb") as fh:
            out = _HashingFile(fh)
            _write_header(out, kvs, tensors, alignment)
            for t in tensors:
                _write_tensor(out, t, alignment)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Written(out.h.hexdigest(), out.n)
