"""What the MODEL declares, for the kernel check: the hyper-parameters (read through the reference's own
architecture modules, one definition) and the weights as raw GGUF bytes.

Nothing here comes from the lane: the engine's own op parameters are compared against these values, never
used in their place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gq

from parity_both.gguf.quants import dequantize
from parity_both.gguf.reader import GGUFFile, TensorInfo, read_gguf
from parity_both.reference.hparams import HParams, Rope

F32 = np.float32

# The FFN activation as a chain of ggml unary ops (relu2 is SQR of RELU), and the fused GLU op that
# means "activation of the gate times up" for it (ggml_glu_op: REGLU 0, GEGLU 1, SWIGLU 2).
ACTIVATION_CHAIN = {"silu": ("SILU",), "relu2": ("RELU", "SQR"), "gelu": ("GELU",)}
GLU_OP = {"silu": 2, "gelu": 1}
ROPE_MODE = {"normal": 0, "neox": 2}  # ggml rope mode bits (GGML_ROPE_TYPE_NEOX = 2)
# HParams features whose graph the check does not model yet (their softmax scale, mask or FFN differ)
UNSUPPORTED_FEATURES = ("qk_norm", "q_scale", "embd_scale", "attn_softcap", "final_softcap", "swa", "moe")


@dataclass
class KernelModel:
    """The model's declared parameters and raw weights."""

    path: Path
    gguf: GGUFFile
    arch: str
    hp: HParams
    _vectors: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, model: str | Path | GGUFFile, activation: str | None = None) -> KernelModel:
        g = model if isinstance(model, GGUFFile) else read_gguf(model)
        hp = HParams.from_gguf(g, activation)
        unsupported = [k for k in UNSUPPORTED_FEATURES if getattr(hp, k)]
        if unsupported:
            raise NotImplementedError(
                f"the kernel check does not model {', '.join(unsupported)} "
                f"({g.architecture}): only plain llama-family attention and FFN"
            )
        return cls(Path(g.path), g, g.architecture, hp)

    # -- declared parameters ----------------------------------------------------------------------
    @property
    def eps(self) -> float:
        return float(F32(self.hp.rms_eps))

    @property
    def kq_scale(self) -> float:
        return float(F32(self.hp.kq_scale))

    @property
    def rope(self) -> Rope:
        return self.hp.rope

    @property
    def rope_mode(self) -> int:
        return ROPE_MODE[self.rope.rope_type]

    @property
    def activation(self) -> str:
        return str(self.hp.activation or "silu")

    def declared(self) -> dict[str, Any]:
        """The parameters the check uses, for the receipt."""
        r = self.rope
        return {
            "architecture": self.arch,
            "rms_eps": self.eps,
            "kq_scale": self.kq_scale,
            "activation": self.activation,
            "rope": {
                "type": r.rope_type,
                "n_rot": r.n_rot,
                "freq_base": r.freq_base,
                "freq_scale": r.freq_scale,
                "attn_factor": r.attn_factor,
            },
        }

    # -- weights -----------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.gguf.tensors

    def info(self, name: str) -> TensorInfo:
        return self.gguf.tensors[name]

    def raw(self, name: str) -> np.ndarray:
        return self.gguf.raw(name)

    def tensor(self, name: str) -> np.ndarray:
        """A small weight (norm vector, scale) dequantized to float32, numpy shape reversed(ne)."""
        if name not in self._vectors:
            t = self.info(name)
            flat = dequantize(self.raw(name), t.type_name, t.n_elements).astype(F32)
            self._vectors[name] = flat.reshape(tuple(reversed(t.shape)) or (1,))
        return self._vectors[name]

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` of a 2-D weight, dequantized as ggml's get_rows does (float32 [len(ids), ne0])."""
        t = self.info(name)
        cols = t.shape[0]
        rb = row_nbytes(t.type_name, cols)
        raw = self.raw(name)
        sel = raw[: t.nbytes // rb * rb].reshape(-1, rb)[np.asarray(ids, dtype=np.int64)].reshape(-1)
        return dequantize(sel, t.type_name, len(ids) * cols).astype(F32).reshape(len(ids), cols)

    def close(self) -> None:
        self.gguf.close()


def row_nbytes(type_name: str, cols: int) -> int:
    plain = {"F32": 4, "F16": 2, "BF16": 2}
    if type_name in plain:
        return cols * plain[type_name]
    if type_name == "I2_S":
        raise NotImplementedError("I2_S rows are not addressable (one per-tensor scale)")
    blk, size = gq.GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    return cols // blk * size
