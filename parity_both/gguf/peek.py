"""Reading just enough of a GGUF header at Snakemake parse time: standard library only (no numpy),
so deciding whether a lane needs a transcoded copy costs milliseconds."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import BinaryIO

GGUF_MAGIC = b"GGUF"

# GGUF metadata value types.
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_STRING = 8
_ARRAY = 9


class GGUFError(ValueError):
    """A GGUF file this tool cannot use; the message says what is wrong and what to do."""


def _read_exact(fh: BinaryIO, n: int, what: str) -> bytes:
    b = fh.read(n)
    if len(b) != n:
        raise GGUFError(f"truncated GGUF: file ends inside {what}")
    return b


def _read_string(fh: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", _read_exact(fh, 8, "a string length"))
    if n > 1 << 30:
        raise GGUFError(f"corrupt GGUF: string length {n} is implausible")
    return _read_exact(fh, n, "a string").decode("utf-8", errors="replace")


def peek_format(path: str | Path) -> tuple[str, frozenset[int]]:
    """(general.architecture, tensor type ids) without materialising metadata arrays: cheap enough for
    Snakemake's parse time (decides whether a lane needs a transcoded copy)."""
    arch = ""
    with open(path, "rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise GGUFError(f"{path} is not a GGUF file (bad magic)")
        fh.read(4)
        n_tensors, n_kv = struct.unpack("<QQ", _read_exact(fh, 16, "the header"))

        def skip(vtype: int) -> None:
            if vtype in _SCALARS:
                fh.seek(_SCALARS[vtype][1], 1)
            elif vtype == _STRING:
                (n,) = struct.unpack("<Q", _read_exact(fh, 8, "a string length"))
                fh.seek(n, 1)
            elif vtype == _ARRAY:
                itype, n = struct.unpack("<IQ", _read_exact(fh, 12, "an array header"))
                if itype in _SCALARS:
                    fh.seek(_SCALARS[itype][1] * n, 1)
                else:
                    for _ in range(n):
                        skip(itype)
            else:
                raise GGUFError(f"corrupt GGUF: unknown metadata value type {vtype}")

        for _ in range(n_kv):
            key = _read_string(fh)
            (vtype,) = struct.unpack("<I", _read_exact(fh, 4, "a value type"))
            if key == "general.architecture" and vtype == _STRING:
                arch = _read_string(fh)
            else:
                skip(vtype)
        types = set()
        for _ in range(n_tensors):
            (n,) = struct.unpack("<Q", _read_exact(fh, 8, "a tensor name"))
            fh.seek(n, 1)
            (n_dims,) = struct.unpack("<I", _read_exact(fh, 4, "tensor dims"))
            fh.seek(8 * n_dims, 1)
            type_id, _offset = struct.unpack("<IQ", _read_exact(fh, 12, "tensor type/offset"))
            types.add(type_id)
    return arch, frozenset(types)


def peek_format_cached(path: str | Path, cache_dir: Path | None = None) -> tuple[str, frozenset[int]]:
    """peek_format, remembered per (path, size, mtime) so repeated parses of the workflow stay fast."""
    import json
    import os

    from parity_both.hashing import cache_dir as project_cache_dir

    p = Path(path)
    st = p.stat()
    key = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    base = cache_dir or project_cache_dir()
    entry = base / "peek" / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")
    try:
        data = json.loads(entry.read_text())
        if data["key"] == key:
            return data["arch"], frozenset(data["types"])
    except (OSError, ValueError, KeyError):
        pass
    arch, types = peek_format(p)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f"{entry.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "arch": arch, "types": sorted(types)}))
        os.replace(tmp, entry)
    except OSError:
        pass
    return arch, types
