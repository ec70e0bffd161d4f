"""The reference's traced intermediates: llama.cpp's node names and order, its layout, no effect on the
logits, and the values llama.cpp itself computes for the nodes both llama.cpp generations name alike."""

from __future__ import annotations

from pathlib import Path

import llama_cpp  # noqa: F401 - required: a missing llama-cpp-python is a failure, not a skip
import numpy as np
import pytest
from test_ggml_emul import capture_llama, capture_sequence

from parity_both.capture import SCHEMA as CAPTURE_SCHEMA
from parity_both.capture import load_capture, save_capture
from parity_both.config import embedded_model_path
from parity_both.fixtures import TensorSpec, read_raw_kvs, write_fixture, write_gguf
from parity_both.gguf.reader import read_gguf
from parity_both.reference.engine import load_model
from parity_both.reference.trace import Recorder, reference_capture, to_current

# "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n" (SmolLM2 vocab)
CHAT_IDS = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]


# --- the October-2024 tree: llama-cpp-python 0.3.1's vendor/llama.cpp/src/llama.cpp ------------------
# Names: cb(tensor, name, il) -> "name-il" (il >= 0) or "name" (llm_build_context's cb, line 16231).
# Order: evaluation order = ggml_visit_parents (sources first, left to right) from the nodes expanded
# by llm_build_kv (q, k, v, line 9627; the merged attention, line 9587) and the graph's output.
def llama_names_2024(n_layer: int, bias: bool = False) -> list[tuple[str, str]]:
    """build_llama (lines 10410-10560) with llm_build_norm (9214: `norm` = ggml_rms_norm, then the mul
    named by the caller), llm_build_kqv (9474: kq, kq_soft_max_ext, kqv, kqv_merged, kqv_merged_cont;
    wo: kqv_wo when a bias follows), llm_build_kv (9605: kqv_out) and llm_build_ffn (9246: ffn_up,
    ffn_up_b, ffn_gate, ffn_gate_b, ffn_silu, ffn_gate_par, ffn_down when down_b); ffn_out is the FFN
    result, its residual add is renamed l_out (cvec.apply_to returns it unchanged)."""
    out = [("inp_embd", "GET_ROWS")]
    for i in range(n_layer):

        def b(name: str, op: str = "ADD", i: int = i) -> list[tuple[str, str]]:
            return [(f"{name}-{i}", op)] if bias else []

        out += [
            (f"norm-{i}", "RMS_NORM"),
            (f"attn_norm-{i}", "MUL"),
            (f"Qcur-{i}", "MUL_MAT"),
            *b("Qcur"),
            (f"Qcur-{i}", "ROPE"),
            (f"Kcur-{i}", "MUL_MAT"),
            *b("Kcur"),
            (f"Kcur-{i}", "ROPE"),
            (f"Vcur-{i}", "MUL_MAT"),
            *b("Vcur"),
            (f"kq-{i}", "MUL_MAT"),
            (f"kq_soft_max_ext-{i}", "SOFT_MAX"),
            (f"kqv-{i}", "MUL_MAT"),
            (f"kqv_merged-{i}", "PERMUTE"),
            (f"kqv_merged_cont-{i}", "CONT"),
            *b("kqv_wo", "MUL_MAT"),
            (f"kqv_out-{i}", "ADD" if bias else "MUL_MAT"),
            (f"ffn_inp-{i}", "ADD"),
            (f"norm-{i}", "RMS_NORM"),
            (f"ffn_norm-{i}", "MUL"),
            (f"ffn_gate-{i}", "MUL_MAT"),
            *b("ffn_gate_b"),
            (f"ffn_silu-{i}", "SILU"),
            (f"ffn_up-{i}", "MUL_MAT"),
            *b("ffn_up_b"),
            (f"ffn_gate_par-{i}", "MUL"),
            *b("ffn_down", "MUL_MAT"),
            (f"ffn_out-{i}", "ADD" if bias else "MUL_MAT"),
            (f"l_out-{i}", "ADD"),
        ]
    return out + [("norm", "RMS_NORM"), ("result_norm", "MUL"), ("result_output", "MUL_MAT")]


def bitnet_names_2024(n_layer: int, scales: bool, act: str = "silu") -> list[tuple[str, str]]:
    """build_bitnet (lines 14959-15110): a scaled Q/K/V matmul is unnamed and its ggml_mul is Qcur/...;
    llm_build_kv without wo renames kqv_merged_cont to kqv_out; attn_sub_norm, then wo (* wo_scale) is
    attn_o_out; llm_build_ffn(up, up_scale, gate, gate_scale, SILU, PAR) names ffn_gate, ffn_gate_s,
    ffn_silu, ffn_up, ffn_up_s and the product, renamed ffn_sub_out; ffn_sub_norm; ffn_down; l_out.
    relu2: llm_build_ffn's LLM_FFN_RELU_SQR names ffn_relu and ffn_sqr(relu) (line 9330)."""
    s = "MUL" if scales else "MUL_MAT"
    act_nodes = [("ffn_silu", "SILU")] if act == "silu" else [("ffn_relu", "RELU"), ("ffn_sqr(relu)", "SQR")]
    out = [("inp_embd", "GET_ROWS")]
    for i in range(n_layer):

        def sc(name: str, i: int = i) -> list[tuple[str, str]]:
            return [(f"{name}_s-{i}", "MUL")] if scales else []

        out += [
            (f"norm-{i}", "RMS_NORM"),
            (f"attn_norm-{i}", "MUL"),
            (f"Qcur-{i}", s),
            (f"Qcur-{i}", "ROPE"),
            (f"Kcur-{i}", s),
            (f"Kcur-{i}", "ROPE"),
            (f"Vcur-{i}", s),
            (f"kq-{i}", "MUL_MAT"),
            (f"kq_soft_max_ext-{i}", "SOFT_MAX"),
            (f"kqv-{i}", "MUL_MAT"),
            (f"kqv_merged-{i}", "PERMUTE"),
            (f"kqv_out-{i}", "CONT"),
            (f"norm-{i}", "RMS_NORM"),
            (f"attn_sub_norm-{i}", "MUL"),
            (f"attn_o_out-{i}", s),
            (f"ffn_inp-{i}", "ADD"),
            (f"norm-{i}", "RMS_NORM"),
            (f"ffn_norm-{i}", "MUL"),
            (f"ffn_gate-{i}", "MUL_MAT"),
            *sc("ffn_gate"),
            *[(f"{n}-{i}", op) for n, op in act_nodes],
            (f"ffn_up-{i}", "MUL_MAT"),
            *sc("ffn_up"),
            (f"ffn_sub_out-{i}", "MUL"),
            (f"norm-{i}", "RMS_NORM"),
            (f"ffn_sub_norm-{i}", "MUL"),
            (f"ffn_down-{i}", s),
            (f"l_out-{i}", "ADD"),
        ]
    return out + [("norm", "RMS_NORM"), ("result_norm", "MUL"), ("result_output", "MUL_MAT")]


def traced(
    path: Path | str, ids: list[int], activation: str | None = None, mode: str = "exact"
) -> tuple[np.ndarray, np.ndarray, Recorder]:
    """(logits without tracing, logits with tracing, the recorder), one batch each."""
    model = load_model(path, activation=activation, mode=mode)
    ids_a = np.asarray(ids)
    off = model.forward(ids_a, model.new_cache(len(ids)))
    rec = Recorder()
    on = model.forward(ids_a, model.new_cache(len(ids)), rec)
    model.close()
    return off, on, rec


def names_ops(rec: Recorder) -> list[tuple[str, str]]:
    return [(n["name"], n["op"]) for n in rec.nodes]


def first(rec: Recorder, name: str, k: int = 0) -> np.ndarray:
    return [rec.arrays[n["key"]] for n in rec.nodes if n["name"] == name][k]


def last(rec: Recorder, name: str) -> np.ndarray:
    return [rec.arrays[n["key"]] for n in rec.nodes if n["name"] == name][-1]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trace")


@pytest.fixture(scope="module")
def llama_f32(tmp: Path) -> Path:
    path = tmp / "llama_f32.gguf"
    write_fixture(path, arch="llama", weight_type="F32", seed=7)
    return path


@pytest.fixture(scope="module")
def bitnet_f32(tmp: Path) -> dict[bool, Path]:
    out = {}
    for scales in (False, True):
        out[scales] = tmp / f"bitnet_f32_{int(scales)}.gguf"
        write_fixture(out[scales], arch="bitnet", weight_type="F32", embed_type="F32", seed=3, scale_tensors=scales)
    return out


def test_embedded_model_trace_names_layout_and_unchanged_logits() -> None:
    """SmolLM2 (30 layers, Q4_1/Q8_0): tracing on or off, the same bits; every node of build_llama."""
    off, on, rec = traced(embedded_model_path(), CHAT_IDS)
    assert np.array_equal(off.view(np.uint32), on.view(np.uint32))
    assert names_ops(rec) == llama_names_2024(30)
    T, d, H, Hkv, hd = len(CHAT_IDS), 576, 9, 3, 64
    shapes = {
        ("attn_norm-0", 0): (T, d),
        ("Qcur-0", 0): (T, H * hd),
        ("Qcur-0", 1): (T, H, hd),
        ("Kcur-0", 1): (T, Hkv, hd),
        ("Vcur-0", 0): (T, Hkv * hd),
        ("kq-0", 0): (H, T, T),
        ("kq_soft_max_ext-0", 0): (H, T, T),
        ("kqv-0", 0): (H, T, hd),
        ("kqv_merged-0", 0): (T, H, hd),
        ("kqv_merged_cont-0", 0): (T, H * hd),
        ("ffn_gate-0", 0): (T, 1536),
        ("l_out-29", 0): (T, d),
        ("result_output", 0): (T, 49152),
    }
    for (name, k), shape in shapes.items():
        assert first(rec, name, k).shape == shape, name
    node = next(n for n in rec.nodes if n["name"] == "attn_norm-0")
    assert node["ne"] == [d, T, 1, 1] and node["type"] == "f32"
    assert np.array_equal(last(rec, "result_output"), on)
    # the softmax rows are causal probabilities; the merged attention is kqv's permutation
    p = first(rec, "kq_soft_max_ext-0")
    np.testing.assert_allclose(p.sum(-1), 1, rtol=1e-5)
    assert (p[:, 0, 1:] == 0).all()
    assert np.array_equal(first(rec, "kqv_merged-0"), first(rec, "kqv-0").transpose(1, 0, 2))


def test_llama_bias_nodes(llama_f32: Path, tmp: Path) -> None:
    g = read_gguf(llama_f32)
    rng = np.random.default_rng(1)
    specs = [TensorSpec(n, t.shape, "F32", lambda n=n: g.raw(n).tobytes()) for n, t in g.tensors.items()]
    for name, t in g.tensors.items():
        if name.startswith("blk.") and name.endswith(".weight") and len(t.shape) == 2:
            bias = (rng.standard_normal(t.shape[1]) * 0.1).astype("<f4").tobytes()
            specs.append(TensorSpec(name[:-7] + ".bias", (t.shape[1],), "F32", lambda b=bias: b))
    path = tmp / "llama_bias.gguf"
    write_gguf(path, read_raw_kvs(llama_f32), specs)
    off, on, rec = traced(path, CHAT_IDS)
    assert np.array_equal(off, on)
    assert names_ops(rec) == llama_names_2024(g.arch_key("block_count"), bias=True)


@pytest.mark.parametrize(("scales", "act"), [(False, "silu"), (True, "silu"), (True, "relu2")])
def test_bitnet_trace_names(scales: bool, act: str, bitnet_f32: dict[bool, Path]) -> None:
    off, on, rec = traced(bitnet_f32[scales], CHAT_IDS, activation=act)
    assert np.array_equal(off, on)
    n_layer = read_gguf(bitnet_f32[scales]).arch_key("block_count")
    assert names_ops(rec) == bitnet_names_2024(n_layer, scales, act)
    assert first(rec, "kqv_out-0").shape == (len(CHAT_IDS), 256)  # the merged attention (wo is later)


def test_ggml_mode_trace_unchanged_logits(bitnet_f32: dict[bool, Path], tmp: Path) -> None:
    path = tmp / "bitnet_tq2.gguf"
    write_fixture(path, arch="bitnet", weight_type="TQ2_0", size="tiny", seed=5, scale_tensors=True)
    off, on, rec = traced(path, CHAT_IDS, mode="ggml")
    assert np.array_equal(off, on) and len(rec.nodes) > 0


# Names both generations give the same tensor (current: llama-cpp-python 0.3.36, src/models/llama.cpp,
# src/models/bitnet.cpp, llama-graph.cpp build_qkv / build_ffn / build_attn_mha); the last node of each
# name (Qcur/Kcur: after RoPE; Vcur: its reshape, same data as the matmul).
SHARED_LLAMA = (
    "attn_norm",
    "Qcur",
    "Kcur",
    "Vcur",
    "kqv",
    "ffn_inp",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_out",
    "l_out",
)
SHARED_BITNET = (
    "attn_norm",
    "Qcur",
    "Kcur",
    "Vcur",
    "kqv",
    "attn_sub_norm",
    "ffn_inp",
    "ffn_norm",
    "ffn_gate",
    "ffn_gate_s",
    "ffn_up",
    "ffn_up_s",
    "ffn_sub_out",
    "ffn_sub_norm",
    "ffn_down",
    "l_out",
)


@pytest.mark.parametrize("arch", ["llama", "bitnet"])
def test_traced_values_equal_llama_cpp_nodes(arch: str, llama_f32: Path, bitnet_f32: dict[bool, Path]) -> None:
    """F32 weights: llama.cpp's own node values (cb_eval) equal the reference's to float32 rounding."""
    path = llama_f32 if arch == "llama" else bitnet_f32[True]
    n_layer = read_gguf(path).arch_key("block_count")
    shared = SHARED_LLAMA if arch == "llama" else SHARED_BITNET
    names = [f"{n}-{i}" for i in range(n_layer) for n in shared] + ["result_norm", "result_output"]
    got = capture_llama(path, CHAT_IDS, set(names))
    _, _, rec = traced(path, CHAT_IDS)
    worst = {}
    for name in names:
        ref = last(rec, name).reshape(-1).astype(np.float64)
        lane = got[name].astype(np.float64)
        assert lane.shape == ref.shape, name
        worst[name] = float(np.sqrt(((lane - ref) ** 2).sum() / (ref**2).sum()))
    print(f"\n{arch}: worst relative error {max(worst.values()):.1e} at {max(worst, key=worst.get)}")
    assert max(worst.values()) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "bitnet", "embedded"])
def test_current_names_match_llama_cpp_0_3_36(arch: str, llama_f32: Path, bitnet_f32: dict[bool, Path]) -> None:
    """to_current: the reference's nodes carry the names, ops and order of llama-cpp-python 0.3.36's graph
    (every node it evaluates under a name the reference emits), and on F32 weights the same values (kq,
    kq_soft_max: llama.cpp's n_kv cache cells cropped to the sequence; permuted views not compared)."""
    path = {"llama": llama_f32, "bitnet": bitnet_f32[True], "embedded": Path(embedded_model_path())}[arch]
    _, _, rec = traced(path, CHAT_IDS)
    ours = to_current(rec.records)
    names = {n for n, _, _ in ours}
    lane = capture_sequence(path, CHAT_IDS, names.__contains__)
    assert [(n, op) for n, op, _, _ in lane] == [(n, op) for n, op, _ in ours]
    if arch == "embedded":
        return  # Q4_1 weights: llama.cpp quantizes the activations (test_reference_llama measures it)
    worst = 0.0
    for (name, op, ne, data), (_, _, ref) in zip(lane, ours, strict=True):
        if op == "PERMUTE":
            continue
        got = data.reshape(list(reversed(ne))).squeeze()
        if name.startswith("kq"):
            got = got[..., : ref.shape[-1]]
        assert got.shape == ref.shape, name
        err = float(np.sqrt(((got.astype(np.float64) - ref) ** 2).sum() / (ref.astype(np.float64) ** 2).sum()))
        worst = max(worst, err)
    print(f"\n{arch}: {len(lane)} nodes, same names/ops/order; worst relative error {worst:.1e}")
    assert worst < 1e-5


def test_reference_capture_format(llama_f32: Path, tmp: Path) -> None:
    index, arrays = reference_capture(llama_f32, CHAT_IDS[:6])
    assert index["schema"] == CAPTURE_SCHEMA and index["n_tokens"] == 6 and index["arch"] == "llama"
    assert [n["i"] for n in index["nodes"]] == list(range(len(index["nodes"])))
    assert set(arrays) == {n["key"] for n in index["nodes"]}
    for n in index["nodes"]:
        a = arrays[n["key"]]
        assert a.dtype == np.float32 and list(reversed(a.shape)) == [x for x in n["ne"][: a.ndim]]
        assert len(n["ne"]) == 4 and n["key"] == f"n{n['i']:04d}"
    save_capture(tmp / "capture" / "p", index, arrays)
    back = load_capture(tmp / "capture" / "p")
    assert back.index == index
    k = index["nodes"][-1]["key"]
    assert np.array_equal(back.arrays[k], arrays[k])
    current, _ = reference_capture(llama_f32, CHAT_IDS[:6], generation="current")
    assert index["names"] == "2024-10" and current["names"] == "current"
    assert [n["name"] for n in index["nodes"]][:2] == ["inp_embd", "norm-0"]
    assert [n["name"] for n in current["nodes"]][:2] == ["embd", "norm-0"]
    with pytest.raises(ValueError, match="generation"):
        reference_capture(llama_f32, CHAT_IDS[:6], generation="2023")
