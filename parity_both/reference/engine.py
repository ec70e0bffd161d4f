"""The reference engine: load a GGUF, dispatch on its architecture, run a greedy continuation.

Architecture modules (reference/llama.py is the one to copy) define three things:

    ARCHITECTURES: tuple[str, ...]
        the general.architecture values the module computes.
    hparams(g: GGUFFile, activation: str | None) -> dict
        validated hyper-parameters, JSON-serializable (recorded as settings["hparams"]). Must hold
        n_layer, n_head_kv, head_dim (the KV cache is sized from them), rope = {"rope_type": ..., ...}
        and "activation" (the one actually used, e.g. "silu" or "relu2"; the caller's `activation`
        argument arrives here). Refuse anything not implemented with NotImplementedError/ValueError
        naming the metadata key or tensor.
    forward(model: LoadedModel, ids: np.ndarray, cache: KVCache, mode: str) -> np.ndarray
        float32 logits [len(ids), n_vocab] for positions cache.n .. cache.n + len(ids) - 1.
        Store each layer's K/V with cache.append(layer, k, v) (returns all keys/values so far) and
        call cache.advance(len(ids)) once at the end. Weights: model.store.matrix(name) gives a
        handle for ops.linear(x, w, mode) (exact or ggml-emulated; streams and releases the
        weight); model.store.vector(name) for norms/biases/scales; model.store.rows_of(name, ids)
        for the embedding lookup; model.lm_head_chunk_rows(w) to bound the LM head's memory.

Then register the module in ARCHITECTURES below (imported lazily: modules import this one).
"""

from __future__ import annotations

import ctypes
import importlib
import os
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from parity_both.gguf.constants import BITNET_ARCHS
from parity_both.gguf.reader import GGUFFile, read_gguf
from parity_both.reference.ops import MODES
from parity_both.reference.weights import (
    CHUNK_BYTES,
    PREPARED_FORMAT,
    PreparedCache,
    WeightStore,
    cached_tensor_names,
    gguf_from_manifest,
    load_manifest,
    prepare_ephemeral,
    prepare_weights,
)

# general.architecture -> module implementing it.
ARCHITECTURES: dict[str, str] = {
    "llama": "parity_both.reference.llama",
    **dict.fromkeys(BITNET_ARCHS, "parity_both.reference.bitnet"),
}


def arch_module(arch: str) -> ModuleType:
    try:
        modname = ARCHITECTURES[arch]
    except KeyError as e:
        raise NotImplementedError(
            f"the reference has no forward graph for architecture {arch!r} "
            f"(implemented: {', '.join(sorted(ARCHITECTURES))})") from e
    return importlib.import_module(modname)


@dataclass
class LoadedModel:
    """What an architecture's forward() gets: hyper-parameters and streamed weights."""

    path: Path
    gguf: GGUFFile
    arch: str
    hp: dict[str, Any]
    store: WeightStore
    activation: str | None = None

    def lm_head_chunk_rows(self, head: Any) -> int:
        """Rows of the LM head per dense block (bounded memory for big vocabularies)."""
        return max(1, CHUNK_BYTES // (4 * head.cols))

    def close(self) -> None:
        self.store.close()


@dataclass
class KVCache:
    """Keys/values per layer, [n_ctx, n_head_kv, head_dim] float32 (as llama.cpp with an F32 cache)."""

    n_layer: int
    n_ctx: int
    n_head_kv: int
    head_dim: int
    n: int = 0  # positions already stored
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
        self.k[layer][self.n:end] = k
        self.v[layer][self.n:end] = v
        return self.k[layer][:end], self.v[layer][:end]

    def advance(self, t: int) -> None:
        self.n += t


@dataclass
class ReferenceResult:
    ids: list[int]  # prompt + greedy continuation
    logits: np.ndarray  # float32 [len(ids), n_vocab]; row i = logits after ids[: i + 1]
    n_prompt: int
    settings: dict[str, Any]  # deterministic, JSON-serializable
    timings: dict[str, float] = field(default_factory=dict)  # never hashed


_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


_OPENBLAS_NAMES = (("scipy_openblas_", "64_"), ("scipy_openblas_", ""), ("openblas_", ""),
                   ("openblas_", "64_"))


def _openblas() -> tuple[Any, str] | None:
    """numpy's OpenBLAS via ctypes (pip wheels bundle scipy-openblas in numpy.libs; conda links a
    shared libopenblas, found in /proc/self/maps) and its symbol prefix/suffix, or None."""
    import glob  # noqa: PLC0415

    paths = sorted(glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs",
                                          "libscipy_openblas*.so*")))
    try:
        with open("/proc/self/maps") as fh:
            paths += sorted({line.split()[-1] for line in fh if "openblas" in line.lower() and "/" in line})
    except OSError:
        pass
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in _OPENBLAS_NAMES:
            name = f"{prefix}%s{suffix}"
            if hasattr(lib, name % "get_num_threads") and hasattr(lib, name % "set_num_threads"):
                return lib, name
    return None


def fix_blas_threads(default: int = 1) -> dict[str, Any]:
    """Fix and report BLAS threads: a count set by the caller (OPENBLAS_NUM_THREADS / OMP_NUM_THREADS,
    read by OpenBLAS at load) is respected; otherwise `default` (1: the pipeline runs jobs side by
    side on few cores, where OpenBLAS threads spinning against each other are 10x slower)."""
    info: dict[str, Any] = {"numpy": np.__version__}
    env = {v: os.environ[v] for v in _THREAD_VARS if os.environ.get(v)}
    info["thread_env"] = env
    found = _openblas()
    if found is None:
        info["blas"] = "unknown (no OpenBLAS found in this process)"
        info["blas_threads"] = None
        info["blas_threads_source"] = "not controlled"
        return info
    lib, name = found
    if not env:
        getattr(lib, name % "set_num_threads")(default)
    get_config = getattr(lib, name % "get_config", None)
    if get_config is not None:
        get_config.restype = ctypes.c_char_p
        info["blas"] = get_config().decode(errors="replace").strip()
    else:
        info["blas"] = "OpenBLAS"
    info["blas_threads"] = int(getattr(lib, name % "get_num_threads")())
    info["blas_threads_source"] = "caller environment" if env else f"reference default {default}"
    return info


def load_model(model_path: str | os.PathLike[str], *, activation: str | None = None,
               gguf: GGUFFile | None = None, cache: PreparedCache | None = None) -> LoadedModel:
    """Parse (or take) the GGUF header, pick the architecture, validate its hyper-parameters."""
    g = gguf if gguf is not None else read_gguf(model_path)
    mod = arch_module(g.architecture)
    hp = mod.hparams(g, activation)
    return LoadedModel(Path(model_path), g, g.architecture, hp, WeightStore(g, cache), hp.get("activation"))


def _open_weights(model_path: str, prepared_dir: str | None, use_cache: bool
                  ) -> tuple[GGUFFile, PreparedCache | None, dict[str, Any]]:
    """The GGUF header and the weights' source: a persistent cache in prepared_dir (its manifest
    also spares re-parsing the header), an ephemeral one (anonymous in-memory file) when the run
    has several steps, or the GGUF itself."""
    if use_cache and prepared_dir is not None:
        manifest = load_manifest(model_path, prepared_dir)
        if manifest is not None:
            g = gguf_from_manifest(model_path, manifest)
        else:
            g = read_gguf(model_path)
            manifest = prepare_weights(model_path, prepared_dir, gguf=g)
        return g, PreparedCache(manifest, prepared_dir), {
            "used": True, "kind": "persistent", "format": PREPARED_FORMAT,
            "model_sha256": manifest["model"]["sha256"]}
    g = read_gguf(model_path)
    if not use_cache or not cached_tensor_names(g):  # e.g. an all-F32 model: nothing to prepare
        return g, None, {"used": False, "kind": None}
    return g, prepare_ephemeral(model_path, g), {"used": True, "kind": "ephemeral", "format": PREPARED_FORMAT}


def run_reference(model_path: str, prompt_ids: list[int], max_tokens: int, *, mode: str = "exact",
                  activation: str | None = None, stop_ids: Collection[int] = (),
                  prepared_dir: str | None = None) -> ReferenceResult:
    """Evaluate the prompt, then greedily generate up to max_tokens (stopping after a stop id).

    Every token, generated ones included, is evaluated, so logits has one row per id. Weights
    are streamed layer by layer; for multi-step runs in exact mode they are read from a
    prepared-weights cache (prepared_dir, or an anonymous in-memory file for this run only)."""
    t0 = time.perf_counter()
    if mode not in MODES:
        raise ValueError(f"unknown reference mode {mode!r} (expected one of {MODES})")
    if not prompt_ids:
        raise ValueError("the prompt must contain at least one token id")
    if max_tokens < 0:
        raise ValueError("max_tokens must be >= 0")
    stop = {int(s) for s in stop_ids}
    model_path = str(model_path)
    blas = fix_blas_threads()
    # exact mode reads every weight once per step: with a prepared_dir, or several steps, read
    # them from a prepared cache. ggml mode works on the raw quantized bytes (no cache).
    use_cache = mode == "exact" and (prepared_dir is not None or max_tokens > 0)
    g, cache, prepared = _open_weights(model_path, prepared_dir, use_cache)
    t_prep = time.perf_counter()
    try:
        model = load_model(model_path, activation=activation, gguf=g, cache=cache)
        hp = model.hp
        n_ctx = len(prompt_ids) + max_tokens
        kv = KVCache(hp["n_layer"], n_ctx, hp["n_head_kv"], hp["head_dim"])
        mod = arch_module(model.arch)
        t1 = time.perf_counter()

        ids = [int(i) for i in prompt_ids]
        rows = [mod.forward(model, np.asarray(ids, dtype=np.int64), kv, mode)]
        t2 = time.perf_counter()
        for _ in range(max_tokens):
            nxt = int(np.argmax(rows[-1][-1]))
            ids.append(nxt)
            rows.append(mod.forward(model, np.asarray([nxt], dtype=np.int64), kv, mode))
            if nxt in stop:
                break
        t3 = time.perf_counter()
        logits = np.ascontiguousarray(np.concatenate(rows, axis=0), dtype=np.float32)
    finally:
        if cache is not None:
            cache.close()
        g.close()

    settings = {
        "engine": "parity-both numpy reference",
        "arch": model.arch,
        "mode": mode,
        "activation": model.activation if model.arch != "llama" else None,
        "dtype": "float32",
        "rope_type": hp["rope"]["rope_type"],
        "n_ctx": n_ctx,
        "kv_cache": "float32",
        "hparams": hp,
        "weight_types": model.gguf.type_counts(),
        "type_numbering": model.gguf.type_numbering,
        "prepared_cache": prepared,
        "greedy": {"max_tokens": max_tokens, "stop_ids": sorted(stop), "tie_break": "lowest id"},
        "numpy": blas,
    }
    timings = {"load_s": (t1 - t0), "prepare_s": t_prep - t0, "prefill_s": t2 - t1, "decode_s": t3 - t2,
               "total_s": time.perf_counter() - t0}
    return ReferenceResult(ids, logits, len(prompt_ids), settings, timings)
