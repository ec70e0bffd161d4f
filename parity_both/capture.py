"""The capture format: every node an engine's graph evaluated for one sequence, written by the lanes
(llama.cpp's graph evaluation callback) and by the reference (its trace), read by localization and the
op-by-op kernel check.

Two files per capture, ``<prefix>.npz`` (arrays) and ``<prefix>.json`` (index)::

    {"schema": "parity-both/capture/1", "engine": "...", "n_tokens": N,
     "nodes": [{"i": 0, "key": "n0000", "name": "attn_norm-0", "op": "RMS_NORM", "ne": [576, 38, 1, 1],
                "type": "f32", "op_params": [...],
                "src": [{"name": "inp_embd", "node": 3 | null, "ne": [...], "type": "f32", "key": "l0003" | null}]}]}

Node data is float32 with numpy shape ``reversed(ne)`` (row-major over ggml's ne). llama.cpp reuses names
for consecutive nodes (``Qcur-5`` after the matmul and after RoPE): evaluation order and op tell them apart.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA = "parity-both/capture/1"
_LAYER = re.compile(r"^(?P<base>.+)-(?P<layer>\d+)$")


@dataclass(frozen=True)
class Node:
    i: int
    name: str
    op: str
    ne: tuple[int, ...]
    key: str | None
    record: Mapping[str, Any]

    @property
    def layer(self) -> int | None:
        m = _LAYER.match(self.name)
        return int(m.group("layer")) if m else None

    @property
    def base(self) -> str:
        m = _LAYER.match(self.name)
        return m.group("base") if m else self.name


class Capture:
    """A loaded capture: the index and lazily read arrays."""

    def __init__(self, index: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        if index.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} capture index (schema {index.get('schema')!r})")
        self.index = index
        self.arrays = arrays
        self.nodes = [
            Node(int(n["i"]), str(n["name"]), str(n["op"]), tuple(int(x) for x in n["ne"]), n.get("key"), n)
            for n in index["nodes"]
        ]

    @property
    def n_tokens(self) -> int:
        return int(self.index["n_tokens"])

    def data(self, node: Node) -> np.ndarray:
        if node.key is None:
            raise KeyError(f"node {node.i} {node.name!r} has no data in this capture")
        return np.asarray(self.arrays[node.key], dtype=np.float32)

    def source(self, key: str) -> np.ndarray:
        return np.asarray(self.arrays[key])

    def named(self) -> Iterator[tuple[str, int, Node]]:
        """(name, occurrence, node) for nodes that carry data, occurrence counting equal names in order."""
        seen: dict[str, int] = {}
        for node in self.nodes:
            if node.key is None:
                continue
            k = seen.get(node.name, 0)
            seen[node.name] = k + 1
            yield node.name, k, node


def capture_paths(prefix: str | Path) -> tuple[Path, Path]:
    p = Path(prefix)
    return p.with_name(p.name + ".npz"), p.with_name(p.name + ".json")


def save_capture(prefix: str | Path, index: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    """Write both files atomically (temporary names, then rename): a killed job leaves no half capture."""
    npz, js = capture_paths(prefix)
    npz.parent.mkdir(parents=True, exist_ok=True)
    tmp_npz = npz.with_name(f".{npz.name}.{os.getpid()}.tmp.npz")
    tmp_js = js.with_name(f".{js.name}.{os.getpid()}.tmp")
    np.savez(tmp_npz, **{k: np.ascontiguousarray(v) for k, v in sorted(arrays.items())})
    tmp_js.write_text(json.dumps({**index, "schema": SCHEMA}, sort_keys=True, separators=(",", ":")) + "\n")
    os.replace(tmp_npz, npz)
    os.replace(tmp_js, js)


def load_capture(prefix: str | Path) -> Capture:
    npz, js = capture_paths(prefix)
    index = json.loads(js.read_text())
    with np.load(npz, allow_pickle=False) as z:
        return Capture(index, {k: z[k] for k in z.files})
