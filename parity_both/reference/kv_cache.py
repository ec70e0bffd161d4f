"""The K/V cache of the reference: float32, as llama.cpp with an F32 cache (type_k = type_v = F32)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class KVCache:
    """Keys/values per layer, [n_ctx, n_head_kv, head_dim] float32; `n` positions stored so far."""

    n_layer: int
    n_ctx: int
    n_head_kv: int
    head_dim: int
    n: int = 0
    k: list[np.ndarray] = field(default_factory=list)
    v: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        shape = (self.n_ctx, self.n_head_kv, self.head_dim)
        self.k = [np.zeros(shape, np.float32) for _ in range(self.n_layer)]
        self.v = [np.zeros(shape, np.float32) for _ in range(self.n_layer)]

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store k/v [T, Hkv, hd] at positions n..n+T-1 of `layer`; return keys/values 0..n+T-1."""
        end = self.n + k.shape[0]
        if end > self.n_ctx:
            raise ValueError(f"KV cache full: {end} positions > n_ctx {self.n_ctx}")
        self.k[layer][self.n : end] = k
        self.v[layer][self.n : end] = v
        return self.k[layer][:end], self.v[layer][:end]

    def advance(self, t: int) -> None:
        self.n += t
