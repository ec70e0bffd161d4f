"""Per-node capture: the one writer of the capture format every lane kind produces.

A lane records every node its engine's graph evaluates (ggml's ``cb_eval``), in evaluation order, as a
*raw capture*: ``nodes`` and ``leaves``, dicts with name, op (``ggml_op_desc``), type, ne, nb, and for
nodes op_params and src; each with its data as float32 in row-major order over ne (numpy shape
``reversed(ne)``), or None for a type that is not converted. A node source is ``{"name", "type", "ne",
"node": index of an earlier captured node | None, "leaf": index into leaves | None, "weight": bool}``
(``None`` for an unused slot before a used one: sources are positional). The C++ harness writes the
raw capture as ``capture.json`` + ``capture.f32`` (see harness/parity_harness.cpp); the
llama-cpp-python lane builds it in memory with the same rules (lanes/llama_cpp_python.py).

``write_capture`` turns it into the capture format of parity_both.capture, ``{prefix}.npz`` (node data under
``n%04d``, leaf data under ``l%04d``)
and ``{prefix}.json``::

    {"schema": "parity-both/capture/1", "engine": ..., "n_tokens": N,
     "nodes": [{"i", "key", "name", "op", "ne", "type", "op_params",
                "src": [{"name", "node", "ne", "type", "key", "weight"}]}],
     "leaves": [{"i", "key", "name", "op", "ne", "type"}]}
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parity_both.capture import SCHEMA, save_capture

RAW_FORMAT = "parity-harness/capture-raw/1"

# ggml type name -> numpy dtype of one element, for the types a capture converts to float32
_DTYPES = {"f32": "<f4", "f16": "<f2", "bf16": "<u2", "i8": "i1", "i16": "<i2", "i32": "<i4", "i64": "<i8"}


def convertible(type_name: str) -> bool:
    return type_name in _DTYPES


def strided_to_f32(raw: np.ndarray, type_name: str, ne: Sequence[int], nb: Sequence[int]) -> np.ndarray:
    """The tensor's elements (raw = its ggml_nbytes bytes) as contiguous float32, numpy shape
    reversed(ne), read through the byte strides nb (views and permutes are not contiguous)."""
    dtype = np.dtype(_DTYPES[type_name])
    shape = tuple(int(n) for n in reversed(ne))
    if 0 in shape:
        return np.zeros(shape, np.float32)
    typed = np.ndarray(shape, dtype=dtype, buffer=raw, strides=tuple(int(b) for b in reversed(nb)))
    if type_name == "bf16":
        return (typed.astype(np.uint32) << 16).view(np.float32)
    return typed.astype(np.float32)


def _key(prefix: str, i: int | None) -> str | None:
    return None if i is None else f"{prefix}{i:04d}"


def write_capture(
    out_prefix: str | Path,
    *,
    engine: str,
    n_tokens: int,
    nodes: Sequence[Mapping[str, Any]],
    leaves: Sequence[Mapping[str, Any]],
    data: Callable[[str, int], np.ndarray | None],
) -> dict[str, Any]:
    """Write {out_prefix}.npz and {out_prefix}.json from a raw capture; ``data(kind, i)`` gives the
    float32 array of node or leaf i (kind "node"/"leaf") or None. Returns the JSON index."""
    arrays: dict[str, np.ndarray] = {}
    saved_leaves: set[int] = set()
    out_leaves = []
    for leaf in leaves:
        arr = data("leaf", int(leaf["i"]))
        key = _key("l", int(leaf["i"])) if arr is not None else None
        if key is not None:
            arrays[key] = arr
            saved_leaves.add(int(leaf["i"]))
        out_leaves.append(
            {
                "i": int(leaf["i"]),
                "key": key,
                "name": leaf["name"],
                "op": leaf["op"],
                "ne": [int(n) for n in leaf["ne"]],
                "type": leaf["type"],
            }
        )
    out_nodes = []
    for node in nodes:
        i = int(node["i"])
        arr = data("node", i)
        key = _key("n", i) if arr is not None else None
        if key is not None:
            arrays[key] = arr
        out_nodes.append(
            {
                "i": i,
                "key": key,
                "name": node["name"],
                "op": node["op"],
                "ne": [int(n) for n in node["ne"]],
                "type": node["type"],
                "op_params": [int(p) for p in node["op_params"]],
                "src": [_source(s, saved_leaves) for s in node["src"]],
            }
        )
    index = {"schema": SCHEMA, "engine": engine, "n_tokens": int(n_tokens), "nodes": out_nodes, "leaves": out_leaves}
    save_capture(out_prefix, index, arrays)
    return index


def _source(src: Mapping[str, Any] | None, saved_leaves: set[int]) -> dict[str, Any] | None:
    if src is None:
        return None
    leaf = src.get("leaf")
    return {
        "name": src["name"],
        "type": src["type"],
        "ne": [int(n) for n in src["ne"]],
        "node": None if src.get("node") is None else int(src["node"]),
        "key": _key("l", int(leaf)) if leaf is not None and int(leaf) in saved_leaves else None,
        "weight": bool(src.get("weight")),
    }


def write_from_raw_dir(raw_dir: str | Path, out_prefix: str | Path, *, engine: str) -> dict[str, Any]:
    """Convert the harness's raw capture (raw_dir/capture.json + capture.f32) to the capture format."""
    raw_dir = Path(raw_dir)
    raw = json.loads((raw_dir / "capture.json").read_text())
    if raw.get("format") != RAW_FORMAT:
        raise ValueError(f"{raw_dir}/capture.json is not a {RAW_FORMAT} capture")
    blob = np.memmap(raw_dir / raw["data_file"], dtype="<f4", mode="r") if raw["n_floats"] else np.zeros(0, "<f4")
    if blob.size != raw["n_floats"]:
        raise ValueError(f"{raw_dir}/{raw['data_file']} holds {blob.size} floats, the index says {raw['n_floats']}")
    tables = {"node": raw["nodes"], "leaf": raw["leaves"]}

    def data(kind: str, i: int) -> np.ndarray | None:
        entry = tables[kind][i]
        d = entry.get("data")
        if d is None:
            return None
        flat = np.asarray(blob[d["offset"] : d["offset"] + d["count"]], dtype=np.float32)
        return flat.reshape(tuple(int(n) for n in reversed(entry["ne"])))

    return write_capture(
        out_prefix, engine=engine, n_tokens=raw["n_tokens"], nodes=raw["nodes"], leaves=raw["leaves"], data=data
    )
