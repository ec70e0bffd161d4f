"""Reading just enough of a GGUF header at Snakemake parse time: standard library only (no numpy),
so deciding whether a lane needs a transcoded copy costs milliseconds."""

from __future__ import annotations

import hashlib
from pathlib import Path

from parity_both.gguf.constants import GGUF_MAGIC, VT_STRING
from parity_both.gguf.lowlevel import GGUFError, iter_keys, iter_tensor_infos, read_header, read_string, skip_value

__all__ = ["GGUF_MAGIC", "GGUFError", "peek_format", "peek_format_cached"]


def peek_format(path: str | Path) -> tuple[str, frozenset[int]]:
    """(general.architecture, tensor type ids) without materialising metadata arrays: cheap enough for
    Snakemake's parse time (decides whether a lane needs a transcoded copy)."""
    arch = ""
    with open(path, "rb") as fh:
        _version, n_tensors, n_kv = read_header(fh, path)
        for key, vtype in iter_keys(fh, n_kv):
            if key == "general.architecture" and vtype == VT_STRING:
                arch = read_string(fh)
            else:
                skip_value(fh, vtype)
        types = {type_id for _name, _shape, type_id, _offset in iter_tensor_infos(fh, n_tensors)}
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
    from parity_both.gguf.reader import read_gguf  # a file is remembered only once fully checked

    read_gguf(p).close()
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f"{entry.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "arch": arch, "types": sorted(types)}))
        os.replace(tmp, entry)
    except OSError:
        pass
    return arch, types
