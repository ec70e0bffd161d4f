"""SHA-256 of model files, computed once per file and reused.

A model's hash is cached under the cache dir keyed by (real path, size, mtime_ns, inode): the same
file named by several config entries, or seen again by a later run, is not hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

ENV_CACHE = "PARITY_BOTH_CACHE"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes (large unbuffered reads: as fast as sha256sum). The one file hasher:
    models, tokenizer files and engine libraries all go through it."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """The project's one cache directory (engine builds, wheels, sdists, hashes): $PARITY_BOTH_CACHE or
    ~/.cache/parity-both."""
    env = os.environ if env is None else env
    return Path(env.get(ENV_CACHE) or Path.home() / ".cache" / "parity-both").expanduser()


def _key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def sha256_cached(path: str | Path) -> tuple[str, bool]:
    """(hex digest, reused?)."""
    p = Path(path)
    key = _key(p)
    store = cache_dir() / "sha256"
    entry = store / (sha256_text(key)[:32] + ".json")
    try:
        data = json.loads(entry.read_text())
        if data.get("key") == key:
            return str(data["sha256"]), True
    except (OSError, ValueError, KeyError):
        pass
    digest = sha256_file(p)
    try:
        store.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "sha256": digest}))
        os.replace(tmp, entry)
    except OSError:
        pass  # an unwritable cache only costs a rehash next time
    return digest, False


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
