"""An F32 copy of a GGUF for the mutation suite: every tensor dequantized with ``gguf.quants.dequantize``,
metadata and vocabulary unchanged (written with ``gguf.GGUFWriter``). A test-side stand-in until the
pipeline's lossless-twin rule (issue 10, item 1) exists; cached under the mutants cache by the source's
SHA-256."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from parity_both.hashing import sha256_cached


def _field_value(f: Any) -> Any:
    t = f.types[0]
    if t == gguf.GGUFValueType.ARRAY:
        if f.types[1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8", errors="surrogateescape") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if t == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8", errors="surrogateescape")
    return f.parts[f.data[0]].tolist()[0]


def write_f32_twin(src: Path | str, dst: Path | str) -> None:
    """Write ``dst``: ``src`` with every tensor as F32 (dequantized), the same keys and values."""
    r = gguf.GGUFReader(str(src))
    arch = _field_value(r.fields["general.architecture"])
    w = gguf.GGUFWriter(str(dst), arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        sub = f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, _field_value(f), f.types[0], sub_type=sub)
    for t in r.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w.add_tensor(t.name, a.reshape([int(x) for x in reversed(t.shape)]), raw_dtype=gguf.GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def f32_twin(src: Path | str, cache: Path) -> Path:
    """The cached F32 twin of ``src`` (written once, atomically)."""
    digest, _ = sha256_cached(src)
    dst = cache / "twins" / f"{Path(src).stem}-{digest[:16]}.f32.gguf"
    if not dst.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".tmp-{os.getpid()}-{dst.name}")
        try:
            write_f32_twin(src, tmp)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
    return dst
