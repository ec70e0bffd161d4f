"""ggml through ctypes, for the per-node capture of the llama-cpp-python lane.

``CaptureRecorder.callback`` is a ``ggml_backend_sched_eval_callback`` for ``llama_context_params.cb_eval``
that records every node the graph evaluates with exactly the rules of the C++ harness's capture
(harness/parity_harness.cpp, "per-node capture"), so both lane kinds produce the same raw capture
(lanes/capture.py) for the same engine version.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import numpy as np

from parity_both.lanes.capture import convertible, strided_to_f32

GGML_MAX_DIMS = 4
GGML_MAX_OP_PARAMS = 64
GGML_MAX_SRC = 10
GGML_MAX_NAME = 64
GGML_BACKEND_BUFFER_USAGE_WEIGHTS = 1
GGML_OBJECT_SIZE = 32  # sizeof(struct ggml_object): offs, size, next, type + padding


class GgmlTensor(ctypes.Structure):
    """struct ggml_tensor of ggml.h as vendored by llama-cpp-python 0.3.36 (no ``grad`` member; the
    layout is checked against ggml_tensor_overhead() when the library is loaded)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


def load_ggml_base(lib_dir: str | Path) -> ctypes.CDLL:
    """libggml-base.so of an installed llama-cpp-python (the copy libllama already loaded)."""
    lib = ctypes.CDLL(str(Path(lib_dir) / "libggml-base.so"))
    for name, res, args in (
        ("ggml_op_desc", ctypes.c_char_p, [ctypes.c_void_p]),
        ("ggml_get_name", ctypes.c_char_p, [ctypes.c_void_p]),
        ("ggml_type_name", ctypes.c_char_p, [ctypes.c_int]),
        ("ggml_nbytes", ctypes.c_size_t, [ctypes.c_void_p]),
        ("ggml_tensor_overhead", ctypes.c_size_t, []),
        ("ggml_backend_tensor_get", None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]),
        ("ggml_backend_buffer_get_usage", ctypes.c_int, [ctypes.c_void_p]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    want = lib.ggml_tensor_overhead() - GGML_OBJECT_SIZE
    if ctypes.sizeof(GgmlTensor) != want:
        raise RuntimeError(
            f"struct ggml_tensor is {want} bytes in {lib_dir}, the ctypes layout {ctypes.sizeof(GgmlTensor)}"
        )
    return lib


class CaptureRecorder:
    """Records the nodes of one decode (between start() and stop()) as a raw capture."""

    def __init__(self, ggml: ctypes.CDLL, callback_type: Any) -> None:
        self.ggml = ggml
        self.callback = callback_type(self._on_eval)  # keep a reference while the context lives
        self.active = False
        self.error: BaseException | None = None
        self.nodes: list[dict[str, Any]] = []
        self.leaves: list[dict[str, Any]] = []
        self.node_data: list[np.ndarray | None] = []
        self.leaf_data: list[np.ndarray | None] = []
        self._node_index: dict[int, int] = {}
        self._leaf_index: dict[int, int] = {}

    def _on_eval(self, t_ptr: int, ask: bool, _user_data: Any) -> bool:
        if not self.active or self.error is not None:
            return False
        if ask:
            return True
        try:
            self._record_node(int(t_ptr))
        except BaseException as exc:  # noqa: BLE001 - never raise into ggml; reported after the decode
            self.error = exc
        return True

    def data(self, kind: str, i: int) -> np.ndarray | None:
        return (self.node_data if kind == "node" else self.leaf_data)[i]

    # -- the rules of the harness's capture
    def _is_weight(self, t: GgmlTensor) -> bool:
        base = GgmlTensor.from_address(t.view_src) if t.view_src else t
        return bool(base.buffer) and self.ggml.ggml_backend_buffer_get_usage(base.buffer) == (
            GGML_BACKEND_BUFFER_USAGE_WEIGHTS
        )

    def _describe(self, ptr: int, t: GgmlTensor) -> dict[str, Any]:
        return {
            "name": self.ggml.ggml_get_name(ptr).decode("utf-8", "replace"),
            "op": self.ggml.ggml_op_desc(ptr).decode(),
            "type": self.ggml.ggml_type_name(t.type).decode(),
            "ne": [int(n) for n in t.ne],
            "nb": [int(n) for n in t.nb],
        }

    def _save(self, ptr: int, t: GgmlTensor, desc: dict[str, Any]) -> np.ndarray | None:
        base = GgmlTensor.from_address(t.view_src) if t.view_src else t
        if not base.buffer or not t.data or self._is_weight(t) or not convertible(desc["type"]):
            return None
        nbytes = int(self.ggml.ggml_nbytes(ptr))
        raw = np.empty(nbytes, dtype=np.uint8)
        if nbytes:
            self.ggml.ggml_backend_tensor_get(ptr, raw.ctypes.data, 0, nbytes)
        return strided_to_f32(raw, desc["type"], desc["ne"], desc["nb"])

    def _leaf(self, ptr: int, t: GgmlTensor) -> int:
        if ptr in self._leaf_index:
            return self._leaf_index[ptr]
        idx = len(self.leaves)
        desc = self._describe(ptr, t)
        self.leaf_data.append(self._save(ptr, t, desc))
        self.leaves.append({"i": idx, **desc})
        self._leaf_index[ptr] = idx
        return idx

    def _source(self, ptr: int | None) -> dict[str, Any] | None:
        if not ptr:
            return None
        s = GgmlTensor.from_address(ptr)
        node = self._node_index.get(ptr)
        weight = node is None and self._is_weight(s)
        leaf = None if node is not None or weight else self._leaf(ptr, s)
        return {
            "name": self.ggml.ggml_get_name(ptr).decode("utf-8", "replace"),
            "type": self.ggml.ggml_type_name(s.type).decode(),
            "ne": [int(n) for n in s.ne],
            "node": node,
            "leaf": leaf,
            "weight": weight,
        }

    def _record_node(self, ptr: int) -> None:
        t = GgmlTensor.from_address(ptr)
        used = [i for i in range(GGML_MAX_SRC) if t.src[i]]
        srcs = [self._source(t.src[k]) for k in range(used[-1] + 1)] if used else []
        idx = len(self.nodes)
        desc = self._describe(ptr, t)
        self.node_data.append(self._save(ptr, t, desc))
        self.nodes.append({"i": idx, **desc, "op_params": [int(p) for p in t.op_params], "src": srcs})
        self._node_index[ptr] = idx
