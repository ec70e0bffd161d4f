"""The llama graph of the NumPy reference against real llama-cpp-python (no mocks).

llama.cpp settings for every comparison: conftest.llama_cpp_model's (F32 K/V cache, flash attention
off, one batch for the whole sequence, logits for every position, its buffer-type policy).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import llama_cpp  # noqa: F401 - required: a missing llama-cpp-python is a failure, not a skip
import numpy as np
import pytest

from parity_both.config import embedded_model_path
from parity_both.reference import run_reference
from parity_both.reference.engine import load_model

from conftest import llama_cpp_logits

# "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n" (SmolLM2 vocab)
CHAT_IDS = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]


def compare(ref: np.ndarray, lane: np.ndarray) -> dict[str, float]:
    a, b = ref.astype(np.float64), lane.astype(np.float64)

    def log_softmax(x: np.ndarray) -> np.ndarray:
        m = x.max(1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(1, keepdims=True))

    la, lb = log_softmax(a), log_softmax(b)
    kl = (np.exp(la) * (la - lb)).sum(1)
    return {
        "nmse": float(((a - b) ** 2).sum() / (a**2).sum()),
        "max_abs": float(np.abs(a - b).max()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1": int((a.argmax(1) == b.argmax(1)).sum()),
        "rows": len(a),
    }


# ---------------------------------------------------------------------------------------------
# Fixtures: tiny F32 llama models with SmolLM2's real vocabulary (llama.cpp loads them)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def f32_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from parity_both.fixtures import write_fixture

    path = tmp_path_factory.mktemp("ref") / "tiny_llama_f32.gguf"
    write_fixture(path, arch="llama", weight_type="F32", seed=7)
    return path


@pytest.fixture(scope="module")
def f32_variant_model(f32_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model plus every optional llama feature: separate output.weight, biases on every
    projection, a fused attn_qkv in layer 0 (with separate q/k/v biases), rope_freqs factors,
    linear RoPE scaling (factor 2), rope.scaling.attn_factor, and an attention.scale key that
    llama.cpp's llama architecture ignores."""
    from parity_both.fixtures import TensorSpec, kv_f32, kv_str, read_raw_kvs, write_gguf
    from parity_both.gguf.reader import read_gguf

    g = read_gguf(f32_model)
    rng = np.random.default_rng(11)
    d, hd = int(g.arch_key("embedding_length")), int(g.arch_key("rope.dimension_count"))

    def f32(a: np.ndarray) -> bytes:
        return np.ascontiguousarray(a, dtype="<f4").tobytes()

    specs: list[TensorSpec] = []
    for name, t in g.tensors.items():
        if name.startswith("blk.0.attn_") and name[11:12] in "qkv" and name.endswith(".weight"):
            continue  # replaced by the fused attn_qkv below
        specs.append(TensorSpec(name, t.shape, "F32", lambda name=name: g.raw(name).tobytes()))
    q, k, v = (g.raw(f"blk.0.attn_{x}.weight").view("<f4").reshape(-1, d) for x in "qkv")
    qkv = np.concatenate([q, k, v])
    specs.append(TensorSpec("blk.0.attn_qkv.weight", (d, qkv.shape[0]), "F32", lambda: f32(qkv)))
    for name, t in list(g.tensors.items()):
        if name.startswith("blk.") and name.endswith(".weight") and len(t.shape) == 2:
            bias = (rng.standard_normal(t.shape[1]) * 0.1).astype(np.float32)
            specs.append(TensorSpec(name[:-7] + ".bias", (t.shape[1],), "F32", lambda b=bias: f32(b)))
    n_vocab = g.tensors["token_embd.weight"].shape[1]
    out = (rng.standard_normal((n_vocab, d)) * 0.3).astype(np.float32)
    specs.append(TensorSpec("output.weight", (d, n_vocab), "F32", lambda: f32(out)))
    factors = rng.uniform(1.0, 4.0, hd // 2).astype(np.float32)
    specs.append(TensorSpec("rope_freqs.weight", (hd // 2,), "F32", lambda: f32(factors)))
    kvs = [kv for kv in read_raw_kvs(f32_model)] + [
        kv_str("llama.rope.scaling.type", "linear"),
        kv_f32("llama.rope.scaling.factor", 2.0),
        kv_f32("llama.rope.scaling.attn_factor", 0.9),
        kv_f32("llama.attention.scale", 0.5),
    ]
    path = f32_model.with_name("tiny_llama_f32_variant.gguf")
    write_gguf(path, kvs, specs)
    return path


# ---------------------------------------------------------------------------------------------
# Exactness on F32 weights: proves the graph (RoPE variant, GQA, norms, softmax, biases, ...)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["plain", "variant"])
def test_f32_fixture_matches_llama_cpp_exactly(which: str, f32_model: Path, f32_variant_model: Path) -> None:
    model = f32_model if which == "plain" else f32_variant_model
    res = run_reference(str(model), CHAT_IDS, 8)
    lane = llama_cpp_logits(model, res.ids)
    m = compare(res.logits, lane)
    print(f"\nF32 fixture ({which}) vs llama-cpp-python: {m}")
    assert res.logits.shape == lane.shape == (len(CHAT_IDS) + 8, 49152)
    assert m["nmse"] <= 1e-10
    assert m["top1"] == m["rows"]
    if which == "variant":
        hp = res.settings["hparams"]
        assert hp["rope"]["freq_scale"] == 0.5 and hp["rope"]["freq_factors"]
        assert abs(hp["rope"]["attn_factor"] - 0.9) < 1e-6
        assert hp["lm_head"] == "output.weight" and hp["attention_scale_key_ignored"] == 0.5


# ---------------------------------------------------------------------------------------------
# The embedded model (Q4_1 / Q8_0): statistical parity, activation quantization explains the rest
# ---------------------------------------------------------------------------------------------
def test_embedded_model_vs_llama_cpp() -> None:
    res = run_reference(embedded_model_path(), CHAT_IDS, 16)
    lane = llama_cpp_logits(embedded_model_path(), res.ids)
    m = compare(res.logits, lane)
    n = res.n_prompt
    gen_agree = int((lane[n - 1 : -1].argmax(1) == np.array(res.ids[n:])).sum())
    print(
        f"\nembedded Q4_1 model vs llama-cpp-python ({len(res.ids)} positions): {m}; "
        f"lane's greedy choice agrees on {gen_agree}/{len(res.ids) - n} generated tokens; "
        f"timings {res.timings}"
    )
    assert res.ids[n : n + 7] == [504, 3575, 282, 4649, 314, 7042, 30]  # "The capital of France is Paris."
    assert m["nmse"] < 5e-3
    assert m["kl_mean"] < 1e-2 and m["kl_max"] < 0.1
    assert m["top1"] >= 0.85 * m["rows"]
    assert gen_agree >= 14


# ---------------------------------------------------------------------------------------------
# Greedy continuation, KV cache, stop ids, caches, settings
# ---------------------------------------------------------------------------------------------
def test_incremental_decode_equals_full_recompute() -> None:
    res = run_reference(embedded_model_path(), CHAT_IDS, 8)
    full = run_reference(embedded_model_path(), res.ids, 0)  # one batch, no cache, weights from the GGUF
    assert full.ids == res.ids and full.logits.shape == res.logits.shape
    np.testing.assert_allclose(res.logits, full.logits, rtol=0, atol=2e-3 * np.abs(full.logits).max())
    assert (res.logits.argmax(1) == full.logits.argmax(1)).all()


def test_kv_cache_forward_in_pieces_equals_one_batch(f32_model: Path) -> None:
    model = load_model(f32_model)
    ids = np.array(CHAT_IDS)
    one = model.forward(ids, model.new_cache(32))
    kv = model.new_cache(32)
    parts = [model.forward(ids[a:b], kv) for a, b in ((0, 5), (5, 6), (6, 16))]
    model.close()
    assert kv.n == len(ids)
    np.testing.assert_allclose(np.concatenate(parts), one, rtol=1e-5, atol=1e-5)


def test_stop_ids_and_zero_tokens(f32_model: Path) -> None:
    base = run_reference(str(f32_model), CHAT_IDS, 6)
    gen = base.ids[len(CHAT_IDS) :]
    assert len(gen) == 6
    stop_at = gen[2]
    first = gen.index(stop_at)
    res = run_reference(str(f32_model), CHAT_IDS, 6, stop_ids=[stop_at, 10**9])
    assert res.ids == base.ids[: len(CHAT_IDS) + first + 1]
    assert res.logits.shape[0] == len(res.ids)
    np.testing.assert_array_equal(res.logits, base.logits[: len(res.ids)])
    none = run_reference(str(f32_model), CHAT_IDS, 0)
    assert none.ids == CHAT_IDS and none.logits.shape == (len(CHAT_IDS), 49152)
    assert none.n_prompt == len(CHAT_IDS)


def test_caches_do_not_change_results_and_settings_are_deterministic(tmp_path: Path) -> None:
    from parity_both.fixtures import write_fixture

    model = tmp_path / "q8.gguf"
    write_fixture(model, arch="llama", weight_type="Q8_0")
    a = run_reference(str(model), CHAT_IDS, 4)  # ephemeral cache
    b = run_reference(str(model), CHAT_IDS, 4, prepared_dir=str(tmp_path / "prep"))
    c = run_reference(str(model), CHAT_IDS, 4, prepared_dir=str(tmp_path / "prep"))  # reused
    d = run_reference(str(model), CHAT_IDS, 0)  # no cache at all (weights dequantized on the fly)
    assert a.ids == b.ids == c.ids
    assert np.array_equal(a.logits, b.logits) and np.array_equal(b.logits, c.logits)
    assert np.array_equal(a.logits[: len(CHAT_IDS)], d.logits)  # same batch shape, same bits
    assert a.settings["prepared_cache"]["kind"] == "ephemeral"
    assert b.settings["prepared_cache"]["kind"] == "persistent"
    assert json.dumps(b.settings, sort_keys=True) == json.dumps(c.settings, sort_keys=True)
    s = b.settings
    assert s["arch"] == "llama" and s["mode"] == "exact" and s["activation"] is None
    assert s["dtype"] == "float32"
    assert s["rope_type"] == "normal" and s["n_ctx"] == len(CHAT_IDS) + 4
    assert s["weight_types"] == {"F32": 5, "Q8_0": 15}  # 2 layers x 2 norms + output_norm
    assert s["numpy"]["blas_threads"] >= 1
    assert set(b.timings) >= {"load_s", "prefill_s", "decode_s", "total_s"}


def test_ggml_mode_on_q8_0_fixture_is_closer_to_llama_cpp(tmp_path: Path) -> None:
    from parity_both.fixtures import write_fixture

    model = tmp_path / "q8.gguf"
    write_fixture(model, arch="llama", weight_type="Q8_0")
    exact = run_reference(str(model), CHAT_IDS, 0)
    emul = run_reference(str(model), CHAT_IDS, 0, mode="ggml")
    lane = llama_cpp_logits(model, CHAT_IDS)
    me, mg = compare(exact.logits, lane), compare(emul.logits, lane)
    print(f"\nQ8_0 fixture vs llama-cpp-python: exact {me}; ggml-emulated {mg}")
    assert emul.settings["mode"] == "ggml"
    assert mg["nmse"] < me["nmse"]


def test_refusals(tmp_path: Path, f32_model: Path) -> None:
    with pytest.raises(ValueError, match="mode"):
        run_reference(str(f32_model), CHAT_IDS, 1, mode="fast")
    with pytest.raises(ValueError, match="at least one"):
        run_reference(str(f32_model), [], 1)
    with pytest.raises(ValueError, match="SiLU"):
        run_reference(str(f32_model), CHAT_IDS, 1, activation="relu2")
    from parity_both.fixtures import TensorSpec, kv_str, read_raw_kvs, write_gguf
    from parity_both.gguf.reader import read_gguf

    g = read_gguf(f32_model)
    kvs = [
        kv if kv.key != "general.architecture" else kv_str("general.architecture", "mamba")
        for kv in read_raw_kvs(f32_model)
    ]
    other = tmp_path / "mamba.gguf"
    write_gguf(
        other, kvs, [TensorSpec(n, t.shape, "F32", lambda n=n: g.raw(n).tobytes()) for n, t in g.tensors.items()]
    )
    with pytest.raises(NotImplementedError, match="mamba"):
        run_reference(str(other), CHAT_IDS, 1)
    kvs = read_raw_kvs(f32_model) + [kv_str("llama.rope.scaling.type", "yarn")]
    yarn = tmp_path / "yarn.gguf"
    write_gguf(yarn, kvs, [TensorSpec(n, t.shape, "F32", lambda n=n: g.raw(n).tobytes()) for n, t in g.tensors.items()])
    with pytest.raises(NotImplementedError, match="YaRN"):
        run_reference(str(yarn), CHAT_IDS, 1)


@pytest.mark.slow
def test_embedded_model_dequantized_to_f32_matches_llama_cpp_exactly(tmp_path: Path) -> None:
    """SmolLM2 at its real dimensions (30 layers, d=576, 9/3 heads, head 64, rope base 1e5),
    every tensor dequantized to F32 (a 540 MB GGUF): llama.cpp then does no activation
    quantization, so the two must agree to float32 rounding. Measured NMSE 2.3e-12."""
    from parity_both.fixtures import TensorSpec, kv_u32, read_raw_kvs, write_gguf
    from parity_both.gguf.reader import read_gguf
    from parity_both.reference.dequant import dequantize

    src = embedded_model_path()
    g = read_gguf(src)
    kvs = [kv if kv.key != "general.file_type" else kv_u32("general.file_type", 0) for kv in read_raw_kvs(src)]

    def f32(t: Any) -> bytes:
        return dequantize(g.raw(t.name), t.type_name, t.n_elements).astype("<f4").tobytes()

    specs = [TensorSpec(n, t.shape, "F32", lambda t=t: f32(t)) for n, t in g.tensors.items()]
    path = tmp_path / "smollm2_f32.gguf"
    write_gguf(path, kvs, specs)
    res = run_reference(str(path), CHAT_IDS, 8)
    m = compare(res.logits, llama_cpp_logits(path, res.ids))
    print(f"\nSmolLM2 dequantized to F32 vs llama-cpp-python: {m}")
    assert m["nmse"] <= 1e-10 and m["top1"] == m["rows"]
