"""The reference engine: load a GGUF, pick its forward graph, run a greedy continuation.

    model = load_model(path, activation=None, mode="exact")   # HParams + WeightStore
    kv = model.new_cache(n_ctx)
    logits = model.forward(ids, kv, trace=None)               # [len(ids), n_vocab], positions kv.n..

A forward graph is a function forward(hp, w, ids, kv, trace=None) -> float32 logits (llama.py is the
one to copy): hp is the model's HParams (hparams.py, which validates the metadata and refuses what
is not implemented), w its WeightStore (w.linear(name, x), w.vector(name), w.rows_of(name, ids)),
kv the KVCache it appends each layer's K/V to (kv.advance(len(ids)) once at the end), trace an
optional callback trace(name, op, array) for the intermediates (trace.py). Register it in GRAPHS.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from parity_both.gguf.constants import BITNET_ARCHS, unsupported_arch_message
from parity_both.gguf.reader import GGUFFile, read_gguf
from parity_both.reference import bitnet, gemma, llama, phi3, qwen
from parity_both.reference.blas import fix_blas_threads, take_row_workers
from parity_both.reference.hparams import HParams
from parity_both.reference.kv_cache import KVCache
from parity_both.reference.ops import Emit
from parity_both.reference.prepared import (
    PREPARED_FORMAT,
    PreparedCache,
    cached_tensor_names,
    gguf_from_manifest,
    load_manifest,
    prepare_ephemeral,
    prepare_weights,
)
from parity_both.reference.weights import MODES, WeightStore

Forward = Callable[[HParams, WeightStore, np.ndarray, KVCache, Emit | None], np.ndarray]

# general.architecture -> its forward graph
GRAPHS: dict[str, Forward] = {
    "llama": llama.forward,
    **dict.fromkeys(BITNET_ARCHS, bitnet.forward),
    "qwen2": qwen.forward,
    "qwen3": qwen.forward,
    "phi3": phi3.forward,
    "gemma2": gemma.forward,
    "gemma3": gemma.forward,
}


def graph_for(arch: str) -> Forward:
    try:
        return GRAPHS[arch]
    except KeyError as e:
        raise NotImplementedError(unsupported_arch_message(arch)) from e


@dataclass
class LoadedModel:
    """A model ready to run: validated hyper-parameters, streamed weights, its forward graph."""

    path: Path
    gguf: GGUFFile
    hp: HParams
    store: WeightStore

    @property
    def arch(self) -> str:
        return self.hp.arch

    def new_cache(self, n_ctx: int) -> KVCache:
        return KVCache(self.hp.n_layer, n_ctx, self.hp.n_head_kv, self.hp.head_dim)

    def forward(self, ids: np.ndarray, kv: KVCache, trace: Emit | None = None) -> np.ndarray:
        return graph_for(self.hp.arch)(self.hp, self.store, ids, kv, trace)

    def close(self) -> None:
        self.store.close()


@dataclass
class ReferenceResult:
    ids: list[int]  # prompt + greedy continuation
    logits: np.ndarray  # float32 [len(ids), n_vocab]; row i = logits after ids[: i + 1]
    n_prompt: int
    settings: dict[str, Any]  # deterministic, JSON-serializable
    timings: dict[str, float] = field(default_factory=dict)  # never hashed


def load_model(
    model_path: str | os.PathLike[str],
    *,
    activation: str | None = None,
    mode: str = "exact",
    gguf: GGUFFile | None = None,
    cache: PreparedCache | None = None,
    threads: int = 1,
) -> LoadedModel:
    """Parse (or take) the GGUF header, validate its hyper-parameters, open its weights (matmuls on
    `threads` threads, see WeightStore)."""
    g = gguf if gguf is not None else read_gguf(model_path)
    hp = HParams.from_gguf(g, activation)
    graph_for(hp.arch)
    return LoadedModel(Path(model_path), g, hp, WeightStore(g, cache, mode, threads))


def _open_weights(
    model_path: str, prepared_dir: str | None, use_cache: bool
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
        return (
            g,
            PreparedCache(manifest, prepared_dir),
            {
                "used": True,
                "kind": "persistent",
                "format": PREPARED_FORMAT,
                "model_sha256": manifest["model"]["sha256"],
            },
        )
    g = read_gguf(model_path)
    if not use_cache or not cached_tensor_names(g):  # e.g. an all-F32 model: nothing to prepare
        return g, None, {"used": False, "kind": None}
    return g, prepare_ephemeral(model_path, g), {"used": True, "kind": "ephemeral", "format": PREPARED_FORMAT}


def _check_args(mode: str, prompt_ids: list[int], max_tokens: int) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown reference mode {mode!r} (expected one of {MODES})")
    if not prompt_ids:
        raise ValueError("the prompt must contain at least one token id")
    if max_tokens < 0:
        raise ValueError("max_tokens must be >= 0")


def greedy(
    model: LoadedModel, prompt_ids: list[int], max_tokens: int, stop: Collection[int], trace: Emit | None = None
) -> tuple[list[int], np.ndarray, dict[str, float]]:
    """Evaluate the prompt in one batch, then generate one token at a time (argmax, lowest id on
    ties) up to max_tokens or after a stop id. Returns (ids, logits [len(ids), n_vocab], timings)."""
    t0 = time.perf_counter()
    kv = model.new_cache(len(prompt_ids) + max_tokens)
    ids = [int(i) for i in prompt_ids]
    model.store.step = f"prefill ({len(ids)} tokens)"
    rows = [model.forward(np.asarray(ids, dtype=np.int64), kv, trace)]
    t1 = time.perf_counter()
    for k in range(max_tokens):
        nxt = int(np.argmax(rows[-1][-1]))
        ids.append(nxt)
        model.store.step = f"decode {k + 1}/{max_tokens}"
        rows.append(model.forward(np.asarray([nxt], dtype=np.int64), kv, trace))
        if nxt in stop:
            break
    t2 = time.perf_counter()
    logits = np.ascontiguousarray(np.concatenate(rows, axis=0), dtype=np.float32)
    return ids, logits, {"prefill_s": t1 - t0, "decode_s": t2 - t1}


def _settings(
    model: LoadedModel,
    mode: str,
    n_ctx: int,
    max_tokens: int,
    stop: set[int],
    prepared: dict[str, Any],
    blas: dict[str, Any],
) -> dict[str, Any]:
    """What the receipt records as reference_settings (deterministic, JSON-serializable)."""
    hp = model.hp
    return {
        "engine": "parity-both numpy reference",
        "arch": hp.arch,
        "mode": mode,
        "activation": hp.activation if hp.is_bitnet or hp.arch.startswith("gemma") else None,
        "dtype": "float32",
        "rope_type": hp.rope.rope_type,
        "n_ctx": n_ctx,
        "kv_cache": "float32",
        "hparams": hp.to_dict(),
        "weight_types": model.gguf.type_counts(),
        "type_numbering": model.gguf.type_numbering,
        "prepared_cache": prepared,
        "greedy": {"max_tokens": max_tokens, "stop_ids": sorted(stop), "tie_break": "lowest id"},
        "numpy": blas,
    }


def run_reference(
    model_path: str,
    prompt_ids: list[int],
    max_tokens: int,
    *,
    mode: str = "exact",
    activation: str | None = None,
    stop_ids: Collection[int] = (),
    prepared_dir: str | None = None,
) -> ReferenceResult:
    """Evaluate the prompt, then greedily generate up to max_tokens (stopping after a stop id).

    Every token, generated ones included, is evaluated, so logits has one row per id. Weights
    are streamed layer by layer; for multi-step runs in exact mode they are read from a
    prepared-weights cache (prepared_dir, or an anonymous in-memory file for this run only)."""
    t0 = time.perf_counter()
    _check_args(mode, prompt_ids, max_tokens)
    stop = {int(s) for s in stop_ids}
    model_path = str(model_path)
    blas = fix_blas_threads()
    threads = take_row_workers(blas)
    # exact mode reads every weight once per step: with a prepared_dir, or several steps, read
    # them from a prepared cache. ggml mode works on the raw quantized bytes (no cache).
    use_cache = mode == "exact" and (prepared_dir is not None or max_tokens > 0)
    g, cache, prepared = _open_weights(model_path, prepared_dir, use_cache)
    t_prep = time.perf_counter()
    model: LoadedModel | None = None
    try:
        model = load_model(model_path, activation=activation, mode=mode, gguf=g, cache=cache, threads=threads)
        t1 = time.perf_counter()
        ids, logits, steps = greedy(model, prompt_ids, max_tokens, stop)
    finally:
        if model is not None:
            model.close()
        else:
            if cache is not None:
                cache.close()
            g.close()
    assert model is not None  # load_model raised otherwise
    settings = _settings(model, mode, len(prompt_ids) + max_tokens, max_tokens, stop, prepared, blas)
    timings = {"load_s": t1 - t0, "prepare_s": t_prep - t0, **steps, "total_s": time.perf_counter() - t0}
    return ReferenceResult(ids, logits, len(prompt_ids), settings, timings)
