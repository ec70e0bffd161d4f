"""The BitNet b1.58 graph of the NumPy reference against real llama-cpp-python (no mocks).

llama.cpp settings for every comparison: conftest.llama_cpp_model's (F32 K/V cache, flash attention
off, one batch for the whole sequence, logits for every position, its buffer-type policy).
Mainline llama.cpp computes the `bitnet` FFN with SiLU; it cannot load I2_S or `bitnet-b1.58`, so
those fixtures reach it through parity_both.gguf.transcode (I2_S -> TQ2_0, lossless for fp16-exact scales).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import llama_cpp  # noqa: F401 - required: a missing llama-cpp-python is a failure, not a skip
import numpy as np
import pytest

from parity_both.fixtures import TensorSpec, kv_str, read_raw_kvs, write_fixture, write_gguf
from parity_both.gguf.reader import read_gguf
from parity_both.metrics import aggregate, compare_positions
from parity_both.reference import run_reference
from parity_both.reference.engine import load_model

from conftest import llama_cpp_logits

# "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n" (SmolLM2 vocab)
CHAT_IDS = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]


def compare(ref: np.ndarray, lane: np.ndarray, ids: list[int]) -> dict[str, Any]:
    """The receipts' own metrics (parity_both.metrics): NMSE, KL(ref||lane) mean, same top-1."""
    agg = aggregate(compare_positions(ref, lane, ids), ref, lane)
    return {
        "nmse": agg["nmse"],
        "kl_mean": agg["mean_kl"],
        "kl_max": agg["kl_percentiles"]["max"],
        "max_abs": agg["max_abs"],
        "top1": agg["same_top1"]["count"],
        "rows": agg["positions"],
    }


def fmt(m: dict[str, Any]) -> str:
    return (
        f"NMSE {m['nmse']:.2e}  KL mean {m['kl_mean']:.2e} (max {m['kl_max']:.2e})  "
        f"max|d| {m['max_abs']:.2e}  top-1 {m['top1']}/{m['rows']}"
    )


def copy_with(
    src: Path, dst: Path, *, arch: str | None = None, extra_kvs: tuple = (), extra_tensors: tuple = ()
) -> Path:
    """Rewrite a GGUF with another architecture name (every `<arch>.*` key renamed), extra keys (replacing
    keys of the same name) or extra tensors."""
    g = read_gguf(src)
    old = g.architecture
    replaced = {kv.key for kv in extra_kvs}
    kvs = []
    for kv in read_raw_kvs(src):
        if kv.key in replaced:
            continue
        if arch is not None and kv.key == "general.architecture":
            kv = kv_str(kv.key, arch)
        elif arch is not None and kv.key.startswith(old + "."):
            kv = type(kv)(arch + kv.key[len(old) :], kv.vtype, kv.value)
        kvs.append(kv)
    specs = [
        TensorSpec(n, t.shape, t.type_name, lambda n=n: g.raw(n).tobytes(), type_id=t.type_id, size=t.nbytes)
        for n, t in g.tensors.items()
    ]
    write_gguf(dst, kvs + list(extra_kvs), specs + list(extra_tensors))
    return dst


# ---------------------------------------------------------------------------------------------
# Fixtures (module scope: each is generated once)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bitnet")


@pytest.fixture(scope="module")
def f32_models(tmp: Path) -> dict[bool, Path]:
    """Tiny bitnet fixtures, F32 everywhere (embedding too: an F16 LM head makes llama.cpp round the
    final activations to fp16), without and with per-matrix scale tensors (same weights otherwise)."""
    out = {}
    for scales in (False, True):
        out[scales] = tmp / f"bitnet_f32_scales{int(scales)}.gguf"
        write_fixture(out[scales], arch="bitnet", weight_type="F32", embed_type="F32", seed=3, scale_tensors=scales)
    return out


@pytest.fixture(scope="module")
def f32_rope_variant(f32_models: dict[bool, Path], tmp: Path) -> Path:
    """With scale tensors, partial rotary dims (32 of 64), linear RoPE scaling x2 and attn_factor 0.9."""
    from parity_both.fixtures import kv_f32, kv_u32

    return copy_with(
        f32_models[True],
        tmp / "bitnet_f32_rope_variant.gguf",
        extra_kvs=(
            kv_u32("bitnet.rope.dimension_count", 32),
            kv_str("bitnet.rope.scaling.type", "linear"),
            kv_f32("bitnet.rope.scaling.factor", 2.0),
            kv_f32("bitnet.rope.scaling.attn_factor", 0.9),
        ),
    )


@pytest.fixture(scope="module")
def tq_models(tmp: Path) -> dict[str, Path]:
    out = {}
    for wt in ("TQ2_0", "TQ1_0"):
        out[wt] = tmp / f"bitnet_{wt}_small.gguf"
        write_fixture(out[wt], arch="bitnet", weight_type=wt, size="small", seed=5, scale_tensors=True)
    return out


@pytest.fixture(scope="module")
def i2s_pair(tmp: Path) -> tuple[Path, Path]:
    from parity_both.gguf.transcode import transcode

    src, dst = tmp / "b158_i2s_small.gguf", tmp / "b158_i2s_small.tq2_0.gguf"
    write_fixture(src, arch="bitnet-b1.58", weight_type="I2_S", size="small", seed=9)
    effect = transcode(src, dst)
    assert effect["output_architecture"] == "bitnet" and effect["max_rel_scale_change"] == 0.0
    return src, dst


# ---------------------------------------------------------------------------------------------
# F32 weights: the graph itself (NEOX RoPE, sub-norms, scales, tied head) is exact
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["no-scales", "scales", "rope-variant"])
def test_f32_bitnet_matches_llama_cpp_exactly(which: str, f32_models: dict[bool, Path], f32_rope_variant: Path) -> None:
    scales = which != "no-scales"
    model = f32_rope_variant if which == "rope-variant" else f32_models[scales]
    res = run_reference(str(model), CHAT_IDS, 8)
    lane = llama_cpp_logits(model, res.ids)
    m = compare(res.logits, lane, res.ids)
    print(f"\nF32 bitnet ({which}) vs llama-cpp-python: {fmt(m)}")
    assert res.logits.shape == lane.shape == (len(CHAT_IDS) + 8, 49152)
    assert m["nmse"] <= 1e-10
    assert m["top1"] == m["rows"]
    hp = res.settings["hparams"]
    assert res.settings["arch"] == "bitnet" and res.settings["rope_type"] == "neox"
    assert hp["activation"] == res.settings["activation"] == "silu"
    assert hp["activation_source"] == "architecture default for 'bitnet'"
    assert hp["lm_head"].startswith("token_embd") and hp["sub_norms"]
    all_scaled = ["attn_k", "attn_output", "attn_q", "attn_v", "ffn_down", "ffn_gate", "ffn_up"]
    assert hp["scale_tensors"] == (all_scaled if scales else [])
    if which == "rope-variant":
        assert hp["rope"]["n_rot"] == 32 and hp["rope"]["freq_scale"] == 0.5
    # F32 weights: the ggml mode does exactly the same arithmetic
    assert np.array_equal(
        run_reference(str(model), res.ids, 0, mode="ggml").logits, run_reference(str(model), res.ids, 0).logits
    )


def test_scale_tensors_are_applied(f32_models: dict[bool, Path]) -> None:
    """Same weights, scales present only in the lane's file: ignoring them is a gross disagreement."""
    lane = llama_cpp_logits(f32_models[True], CHAT_IDS)
    without = compare(run_reference(str(f32_models[False]), CHAT_IDS, 0).logits, lane, CHAT_IDS)
    print(f"\nreference without scales vs llama.cpp with scales: {fmt(without)}")
    assert without["nmse"] > 1e-3


def test_kv_cache_forward_in_pieces_equals_one_batch(f32_models: dict[bool, Path]) -> None:
    model = load_model(f32_models[True])
    ids = np.array(CHAT_IDS)
    one = model.forward(ids, model.new_cache(32))
    kv = model.new_cache(32)
    parts = [model.forward(ids[a:b], kv) for a, b in ((0, 5), (5, 6), (6, 16))]
    model.close()
    assert kv.n == len(ids)
    # float32 matmuls of other batch shapes round differently: tolerance relative to the logit scale
    np.testing.assert_allclose(np.concatenate(parts), one, rtol=0, atol=2e-6 * np.abs(one).max())


# ---------------------------------------------------------------------------------------------
# Ternary weights: exact vs ggml-emulated (Q8_K activations) reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("wt", ["TQ2_0", "TQ1_0"])
def test_ternary_fixture_both_modes(wt: str, tq_models: dict[str, Path]) -> None:
    model = tq_models[wt]
    exact = run_reference(str(model), CHAT_IDS, 8)
    lane = llama_cpp_logits(model, exact.ids)
    emul = run_reference(str(model), exact.ids, 0, mode="ggml")
    me, mg = compare(exact.logits, lane, exact.ids), compare(emul.logits, lane, exact.ids)
    print(
        f"\n{wt} bitnet (small, scale tensors) vs llama-cpp-python:\n  exact: {fmt(me)}\n"
        f"  ggml:  {fmt(mg)}\n  exact/ggml NMSE ratio {me['nmse'] / mg['nmse']:.1e}"
    )
    assert emul.settings["mode"] == "ggml" and exact.settings["hparams"]["activation"] == "silu"
    # exact: the activation quantization of ggml (Q8_K) is the whole difference, statistically small
    assert me["kl_mean"] < 2e-2 and me["top1"] >= 0.8 * me["rows"]
    # ggml: exact per op up to float32 summation order; at this size (4 layers x 24 positions) hardly any
    # activation lands on the other side of a Q8_K rounding boundary, so nothing compounds: measured
    # ~5e6 x closer here; required: 10 x (a flipped boundary would cost ~1e-6, hence the loose bound)
    assert mg["nmse"] <= 1e-6 and mg["top1"] >= mg["rows"] - 1
    assert mg["nmse"] * 10 <= me["nmse"]


def test_embedded_smollm2_both_modes(tmp: Path) -> None:
    """Measured, not required closer: on the 30-layer SmolLM2 (Q4_1 + Q8_0 head) the emulated mode is no
    closer end to end than the exact one (see the report: a flipped activation-rounding boundary is a
    whole quantization step, and 30 layers x 32 positions give many chances)."""
    from parity_both.config import embedded_model_path

    path = embedded_model_path()
    exact = run_reference(path, CHAT_IDS, 16, prepared_dir=str(tmp / "prep_smol"))
    lane = llama_cpp_logits(path, exact.ids)
    emul = run_reference(path, exact.ids, 0, mode="ggml")
    me, mg = compare(exact.logits, lane, exact.ids), compare(emul.logits, lane, exact.ids)
    print(f"\nSmolLM2 Q4_1 vs llama-cpp-python ({len(exact.ids)} positions):\n  exact: {fmt(me)}\n  ggml:  {fmt(mg)}")
    for m in (me, mg):
        assert m["kl_mean"] < 1e-2 and m["top1"] >= 0.85 * m["rows"]


# ---------------------------------------------------------------------------------------------
# The activation setting decides the verdict
# ---------------------------------------------------------------------------------------------
def test_relu2_reference_disagrees_with_silu_engine(tq_models: dict[str, Path]) -> None:
    model = tq_models["TQ2_0"]
    lane = llama_cpp_logits(model, CHAT_IDS)
    out = {}
    for act in ("silu", "relu2"):
        res = run_reference(str(model), CHAT_IDS, 0, mode="ggml", activation=act)
        assert res.settings["hparams"]["activation"] == res.settings["activation"] == act
        assert res.settings["hparams"]["activation_source"] == "caller"
        out[act] = compare(res.logits, lane, CHAT_IDS)
        print(f"\nllama.cpp (SiLU) vs reference activation={act}: {fmt(out[act])}")
    assert out["silu"]["kl_mean"] < 1e-4
    assert out["relu2"]["kl_mean"] > 0.5 and out["relu2"]["kl_mean"] > 1e5 * out["silu"]["kl_mean"]


# ---------------------------------------------------------------------------------------------
# I2_S (BitNet.cpp layout, `bitnet-b1.58`): both reference modes; llama.cpp via the transcoded copy
# ---------------------------------------------------------------------------------------------
def test_i2s_fixture_both_modes_vs_transcoded_lane(i2s_pair: tuple[Path, Path]) -> None:
    src, dst = i2s_pair
    lane = llama_cpp_logits(dst, CHAT_IDS)
    default = run_reference(str(src), CHAT_IDS, 0)
    hp = default.settings["hparams"]
    assert default.settings["arch"] == "bitnet-b1.58" and default.settings["weight_types"]["I2_S"] == 28
    assert hp["activation"] == "relu2"
    assert hp["activation_source"] == "architecture default for 'bitnet-b1.58'"
    rows = {"relu2 (default), exact": compare(default.logits, lane, CHAT_IDS)}
    for mode in ("exact", "ggml"):
        res = run_reference(str(src), CHAT_IDS, 0, mode=mode, activation="silu")
        rows[f"silu, {mode}"] = compare(res.logits, lane, CHAT_IDS)
    tq = run_reference(str(dst), CHAT_IDS, 0, mode="ggml")
    rows["transcoded TQ2_0 file, silu, ggml"] = compare(tq.logits, lane, CHAT_IDS)
    print("\nI2_S bitnet-b1.58 reference vs llama.cpp on the transcoded TQ2_0 copy:")
    for k, m in rows.items():
        print(f"  {k:34s} {fmt(m)}")
    # same weights: the exact reference gives the same logits from either file, to float32 rounding (I2_S's one
    # scale is folded into x, (x d) C^T, where TQ2_0's block scales multiply the codes: measured 3.2e-5 at
    # logits up to ~24, i.e. ~1.3e-6 relative)
    from_i2s = run_reference(str(src), CHAT_IDS, 0, activation="silu").logits
    tq2_logits = run_reference(str(dst), CHAT_IDS, 0).logits
    np.testing.assert_allclose(tq2_logits, from_i2s, rtol=0, atol=5e-6 * np.abs(from_i2s).max())
    assert rows["silu, exact"]["kl_mean"] < 5e-2 and rows["silu, exact"]["top1"] >= 0.8 * len(CHAT_IDS)
    # ggml mode emulates BitNet.cpp's per-token int8 activations, not llama.cpp's Q8_K: statistical only
    assert rows["silu, ggml"]["kl_mean"] < 5e-2
    assert rows["transcoded TQ2_0 file, silu, ggml"]["nmse"] < 1e-6
    # the trained activation (relu2) against the SiLU engine: the finding the receipts show
    assert rows["relu2 (default), exact"]["kl_mean"] > 0.5


@pytest.mark.parametrize("mode", ["exact", "ggml"])
def test_i2s_greedy_decode(mode: str, i2s_pair: tuple[Path, Path]) -> None:
    """Multi-step runs: exact mode reads the I2_S weights through the prepared cache."""
    src, _ = i2s_pair
    res = run_reference(str(src), CHAT_IDS, 4, mode=mode)
    full = run_reference(str(src), res.ids, 0, mode=mode)
    assert len(res.ids) == len(CHAT_IDS) + 4 and np.isfinite(res.logits).all()
    assert (res.logits.argmax(1) == full.logits.argmax(1)).all()
    assert res.settings["type_numbering"] == "bitnet.cpp"


# ---------------------------------------------------------------------------------------------
# Architecture names, the hidden_activation key, refusals
# ---------------------------------------------------------------------------------------------
def test_names_hidden_activation_key_and_refusals(tmp: Path, f32_models: dict[bool, Path]) -> None:
    from parity_both.fixtures import kv_f32

    base = f32_models[False]
    silu = run_reference(str(base), CHAT_IDS, 0)
    relu = run_reference(str(base), CHAT_IDS, 0, activation="relu2")
    for arch in ("bitnet-b1.58", "bitnet-25"):
        res = run_reference(str(copy_with(base, tmp / f"{arch}.gguf", arch=arch)), CHAT_IDS, 0)
        assert res.settings["hparams"]["activation"] == "relu2", arch
        assert np.array_equal(res.logits, relu.logits), arch
    relu2_key = kv_str("bitnet.hidden_activation", "relu2")
    declared = copy_with(base, tmp / "declared.gguf", extra_kvs=(relu2_key,))
    res = run_reference(str(declared), CHAT_IDS, 0)
    assert res.settings["hparams"]["activation_source"] == "metadata bitnet.hidden_activation='relu2'"
    assert np.array_equal(res.logits, relu.logits)
    assert np.array_equal(run_reference(str(declared), CHAT_IDS, 0, activation="silu").logits, silu.logits)

    weird = copy_with(base, tmp / "gelu.gguf", extra_kvs=(kv_str("bitnet.hidden_activation", "gelu"),))
    with pytest.raises(NotImplementedError, match="hidden_activation"):
        run_reference(str(weird), CHAT_IDS, 0)
    with pytest.raises(ValueError, match="activation"):
        run_reference(str(base), CHAT_IDS, 0, activation="gelu")
    bias = np.zeros(256, dtype="<f4").tobytes()
    biased = copy_with(
        base, tmp / "bias.gguf", extra_tensors=(TensorSpec("blk.0.attn_q.bias", (256,), "F32", lambda: bias),)
    )
    with pytest.raises(NotImplementedError, match="bias"):
        run_reference(str(biased), CHAT_IDS, 0)
    yarn = copy_with(
        base,
        tmp / "yarn.gguf",
        extra_kvs=(kv_str("bitnet.rope.scaling.type", "yarn"), kv_f32("bitnet.rope.scaling.factor", 4.0)),
    )
    with pytest.raises(NotImplementedError, match="YaRN"):
        run_reference(str(yarn), CHAT_IDS, 0)


# ---------------------------------------------------------------------------------------------
# Memory: peak RSS of a child process within file size + 50% + 200 MiB
# ---------------------------------------------------------------------------------------------
_CHILD = """
import sys
from parity_both.reference import run_reference
run_reference(sys.argv[1], {ids}, int(sys.argv[3]), mode=sys.argv[2])
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def peak_rss_mib(model: Path, mode: str, max_tokens: int) -> float:
    # the child's own high-water mark (VmHWM of its address space): getrusage's ru_maxrss of a child keeps
    # the forking process's resident set, i.e. this whole test session's
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD.format(ids=CHAT_IDS), str(model), mode, str(max_tokens)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(proc.stdout.split()[-1]) / 1024  # kB


def _memory_check(model: Path) -> None:
    size = model.stat().st_size / 2**20
    bound = 1.5 * size + 200
    rows = {(mode, n): peak_rss_mib(model, mode, n) for mode in ("exact", "ggml") for n in (0, 4)}
    print(
        f"\n{model.name} ({size:.0f} MiB, bound {bound:.0f} MiB): "
        + json.dumps({f"{m} max_tokens={n}": round(v) for (m, n), v in rows.items()})
    )
    assert max(rows.values()) <= bound


@pytest.mark.slow  # writes a 120 MiB fixture
def test_memory_large_fixture(tmp: Path) -> None:
    model = tmp / "bitnet_large_tq2_0.gguf"
    write_fixture(model, arch="bitnet", weight_type="TQ2_0", size="large", seed=1)  # ~120 MiB
    _memory_check(model)


@pytest.mark.slow
@pytest.mark.parametrize("wt", ["TQ2_0", "I2_S"])
def test_memory_few_hundred_mb_fixture(wt: str, tmp: Path) -> None:
    model = tmp / f"bitnet_big_{wt}.gguf"  # ~325 MiB: 12 layers of d=2048, n_ff=5632, F16 embedding
    arch = "bitnet" if wt == "TQ2_0" else "bitnet-b1.58"
    write_fixture(
        model,
        arch=arch,
        weight_type=wt,
        size="large",
        seed=1,
        n_embd=2048,
        n_layer=12,
        n_head=16,
        n_head_kv=4,
        n_ff=5632,
    )
    _memory_check(model)
