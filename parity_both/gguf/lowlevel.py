"""The one GGUF parser: value types, strings, metadata values, the header and the tensor table.

Standard library only (no numpy): the parse-time peek (peek.py) runs at Snakemake parse time and must
stay fast; the full reader (reader.py) and the raw key/value copy (writer.read_raw_kvs) build on the
same functions, so the format is parsed in one place.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterator
from typing import Any, BinaryIO

from parity_both.gguf.constants import (
    BITNET_TYPES,
    GGUF_MAGIC,
    I2S_TAIL_BYTES,
    MAINLINE_TYPES,
    VALUE_SCALARS,
    VT_ARRAY,
    VT_STRING,
)

MAX_STRING = 1 << 30
MAX_ARRAY = 1 << 31
MAX_COUNT = 1 << 24  # tensors or keys in one file
MAX_DIMS = 8


class GGUFError(ValueError):
    """A GGUF file this tool cannot use; the message says what is wrong and what to do."""


def _remaining(fh: BinaryIO) -> int | None:
    try:
        return os.fstat(fh.fileno()).st_size - fh.tell()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return len(fh.getbuffer()) - fh.tell() if isinstance(fh, io.BytesIO) else None


def read_exact(fh: BinaryIO, n: int, what: str) -> bytes:
    if n > 1 << 16:  # a header that lies about a size must not make us allocate it
        left = _remaining(fh)
        if left is not None and n > left:
            raise GGUFError(f"truncated GGUF: file ends inside {what} ({n} bytes claimed, {left} left)")
    b = fh.read(n)
    if len(b) != n:
        raise GGUFError(f"truncated GGUF: file ends inside {what}")
    return b


def read_u32(fh: BinaryIO, what: str) -> int:
    return struct.unpack("<I", read_exact(fh, 4, what))[0]


def read_u64(fh: BinaryIO, what: str) -> int:
    return struct.unpack("<Q", read_exact(fh, 8, what))[0]


def read_string_bytes(fh: BinaryIO) -> bytes:
    n = read_u64(fh, "a string length")
    if n > MAX_STRING:
        raise GGUFError(f"corrupt GGUF: string length {n} is implausible")
    return read_exact(fh, n, "a string")


def read_string(fh: BinaryIO) -> str:
    return read_string_bytes(fh).decode("utf-8", errors="replace")


_U64 = struct.Struct("<Q")
_READ_AHEAD = 1 << 20


def read_strings(fh: BinaryIO, n: int, keep: str | None = "str") -> list[Any]:
    """n strings (keep="str": decoded as read_string does; "bytes": undecoded; None: skipped), parsed
    from 1 MiB read-ahead blocks rather than two reads per string (a 256k-token vocabulary: ~0.15 s
    instead of ~1.2 s); fh is left right after the last string, and truncation or an implausible
    length fails as read_string_bytes does."""
    out: list[Any] = []
    buf, pos = b"", 0
    for _ in range(n):
        if len(buf) - pos < 8:
            buf, pos = buf[pos:] + fh.read(max(_READ_AHEAD, 8)), 0
            if len(buf) < 8:
                raise GGUFError("truncated GGUF: file ends inside a string length")
        (size,) = _U64.unpack_from(buf, pos)
        if size > MAX_STRING:
            raise GGUFError(f"corrupt GGUF: string length {size} is implausible")
        end = pos + 8 + size
        if end > len(buf):
            need = end - len(buf)
            left = _remaining(fh) if need > 1 << 16 else None
            if left is not None and need > left:
                raise GGUFError(f"truncated GGUF: file ends inside a string ({size} bytes claimed, {left} left)")
            buf, pos, end = buf[pos:] + fh.read(max(need, _READ_AHEAD)), 0, end - pos
            if end > len(buf):
                raise GGUFError("truncated GGUF: file ends inside a string")
        if keep == "str":
            out.append(buf[pos + 8 : end].decode("utf-8", errors="replace"))
        elif keep:
            out.append(buf[pos + 8 : end])
        pos = end
    if len(buf) > pos:
        fh.seek(pos - len(buf), 1)  # give back what was read ahead
    return out


def read_array_header(fh: BinaryIO) -> tuple[int, int]:
    """(item value type, item count) of an array value."""
    itype, n = struct.unpack("<IQ", read_exact(fh, 12, "an array header"))
    if n > MAX_ARRAY:
        raise GGUFError(f"corrupt GGUF: array length {n} is implausible")
    return itype, n


def skip_value(fh: BinaryIO, vtype: int) -> None:
    """Move past one metadata value without materialising it."""
    if vtype in VALUE_SCALARS:
        fh.seek(VALUE_SCALARS[vtype][1], 1)
    elif vtype == VT_STRING:
        n = read_u64(fh, "a string length")
        if n > MAX_STRING:
            raise GGUFError(f"corrupt GGUF: string length {n} is implausible")
        fh.seek(n, 1)
    elif vtype == VT_ARRAY:
        itype, n = read_array_header(fh)
        if itype in VALUE_SCALARS:
            fh.seek(VALUE_SCALARS[itype][1] * n, 1)
        elif itype == VT_STRING:
            read_strings(fh, n, keep=None)
        else:
            for _ in range(n):
                skip_value(fh, itype)
    else:
        raise GGUFError(f"corrupt GGUF: unknown metadata value type {vtype}")


def read_value(fh: BinaryIO, vtype: int) -> Any:
    """One metadata value as Python data (strings decoded with errors='replace', arrays as lists)."""
    if vtype in VALUE_SCALARS:
        fmt, size = VALUE_SCALARS[vtype]
        return struct.unpack(fmt, read_exact(fh, size, "a metadata value"))[0]
    if vtype == VT_STRING:
        return read_string(fh)
    if vtype == VT_ARRAY:
        itype, n = read_array_header(fh)
        if itype in VALUE_SCALARS:
            fmt, size = VALUE_SCALARS[itype]
            data = read_exact(fh, size * n, "an array")
            return list(struct.unpack(f"<{n}{fmt[1]}", data))
        if itype == VT_STRING:
            return read_strings(fh, n)
        return [read_value(fh, itype) for _ in range(n)]
    raise GGUFError(f"corrupt GGUF: unknown metadata value type {vtype}")


def read_value_raw(fh: BinaryIO, vtype: int) -> bytes:
    """One metadata value's encoded bytes exactly as they sit in the file (after the type field)."""
    start = fh.tell()
    skip_value(fh, vtype)
    end = fh.tell()
    fh.seek(start)
    return read_exact(fh, end - start, "a metadata value")


def read_header(fh: BinaryIO, path: object = "file") -> tuple[int, int, int]:
    """(version, tensor count, key count) after checking the magic; fh is left at the first key."""
    if fh.read(4) != GGUF_MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (bad magic); point --model-gguf at a .gguf model")
    version = read_u32(fh, "the version")
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version} is not supported (expected 2 or 3)")
    n_tensors, n_kv = struct.unpack("<QQ", read_exact(fh, 16, "the header"))
    if n_tensors > MAX_COUNT or n_kv > MAX_COUNT:
        raise GGUFError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")
    return version, n_tensors, n_kv


def iter_keys(fh: BinaryIO, n_kv: int) -> Iterator[tuple[str, int]]:
    """(key, value type) of each metadata entry; the consumer MUST read or skip the value before the
    next iteration (read_value / skip_value / read_value_raw)."""
    for _ in range(n_kv):
        key = read_string(fh)
        yield key, read_u32(fh, "a value type")


def iter_tensor_infos(fh: BinaryIO, n_tensors: int) -> Iterator[tuple[str, tuple[int, ...], int, int]]:
    """(name, shape in ggml order, type id, offset relative to the data section) of each tensor."""
    for _ in range(n_tensors):
        name = read_string(fh)
        n_dims = read_u32(fh, "tensor dims")
        if n_dims > MAX_DIMS:
            raise GGUFError(f"corrupt tensor info for {name!r} ({n_dims} dims)")
        shape = struct.unpack(f"<{n_dims}Q", read_exact(fh, 8 * n_dims, "tensor shape"))
        type_id, offset = struct.unpack("<IQ", read_exact(fh, 12, "tensor type/offset"))
        yield name, tuple(int(s) for s in shape), type_id, offset


def check_alignment(alignment: object) -> int:
    """general.alignment: a power of two (GGUF's rule); anything else is a corrupt header."""
    if not isinstance(alignment, int) or alignment < 1 or alignment > 1 << 20 or alignment & (alignment - 1):
        raise GGUFError(f"corrupt GGUF: general.alignment {alignment!r} is not a power of two")
    return alignment


def align(pos: int, alignment: int) -> int:
    return (pos + alignment - 1) // alignment * alignment


# by name: names are unique across both numberings; TL1/TL2 (no fixed layout) are left out
TYPE_BLOCKS = {name: (blk, size) for name, blk, size in (*MAINLINE_TYPES.values(), *BITNET_TYPES.values()) if blk}


def tensor_nbytes(type_name: str, n_elements: int) -> int:
    """Bytes of a tensor of ``n_elements`` values of a ggml type (by name; BitNet.cpp's I2_S included)."""
    if type_name == "I2_S":
        return n_elements // 4 + I2S_TAIL_BYTES
    if type_name not in TYPE_BLOCKS:
        raise GGUFError(f"tensor type {type_name} has no fixed layout this tool can read")
    blk, size = TYPE_BLOCKS[type_name]
    if n_elements % blk:
        raise GGUFError(f"{type_name} needs a multiple of {blk} elements, got {n_elements}")
    return n_elements // blk * size
