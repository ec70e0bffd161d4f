"""The op-by-op kernel check (parity_both.compare.kernels) on real lane captures of the embedded model.

Honest captures (llama-cpp-python's cb_eval, 32 positions) pass with every node within its floor. Planted
bugs are emulated in copies of that capture - one node's data or op_params changed, the bad data computed
here independently of the module (a Q4_1 dot product without its min term, GELU for SiLU, a mask cell
flipped) - and each must be the first failing node, with the right op and weight type. Consumers of a
perturbed node are not re-run through an engine, so the perturbed node's own row is re-checked and put in
place of its honest row; the end-to-end test runs the whole check on one perturbed capture.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from parity_both.capture import Capture, Node, load_capture
from parity_both.compare.kernels import FLOORS, KernelModel, check_kernels, check_node, node_rows, summarize
from parity_both.compare.kernels.kvcache import kv_expectations
from parity_both.compare.kernels.recompute import Context
from parity_both.lanes.llama_cpp_python import LlamaCppPythonLane

TEXT = (
    "<|im_start|>system\nYou are a concise assistant.<|im_end|>\n<|im_start|>user\nName three primary "
    "colours.<|im_end|>\n<|im_start|>assistant\nWhat is the capital of France?"
)


@pytest.fixture(scope="module")
def honest(smol_path: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    lane = LlamaCppPythonLane(smol_path, n_ctx=64, threads=2)
    try:
        ids = lane.tokenize(TEXT, True)
        assert 30 <= len(ids) <= 40, len(ids)
        prefix = tmp_path_factory.mktemp("kernels") / "python"
        lane.eval_capture(ids, prefix)
    finally:
        lane.close()
    cap = load_capture(prefix)
    model = KernelModel.open(smol_path)
    return {"cap": cap, "model": model, "rows": node_rows(cap, model), "prefix": prefix}


def _node(cap: Capture, name: str, op: str, k: int = 0) -> Node:
    return [n for n in cap.nodes if n.name == name and n.op == op][k]


class _Overlay(Mapping[str, np.ndarray]):
    """The capture's arrays with some replaced (read lazily, as the npz is)."""

    def __init__(self, base: Mapping[str, np.ndarray]) -> None:
        self.base, self.new = base, {}

    def __getitem__(self, key: str) -> np.ndarray:
        return self.new[key] if key in self.new else self.base[key]

    def __setitem__(self, key: str, value: np.ndarray) -> None:
        self.new[key] = value

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def _perturbed(
    cap: Capture, node: Node, data: np.ndarray | None = None, op_params: dict[int, int] | None = None
) -> Capture:
    """A copy of the capture with one node's data and/or op_params replaced."""
    index = copy.deepcopy(dict(cap.index))
    arrays = _Overlay(cap.arrays)
    if data is not None:
        arrays[node.key] = np.asarray(data, dtype=np.float32).reshape(arrays[node.key].shape)
    for k, v in (op_params or {}).items():
        index["nodes"][node.i]["op_params"][k] = v
    return Capture(index, arrays)


def _recheck(h: dict[str, Any], cap: Capture, node: Node) -> dict[str, Any]:
    """The kernels section with the perturbed node's row recomputed on the perturbed capture."""
    ctx = Context(cap, h["model"])
    row = check_node(ctx, cap.nodes[node.i], kv_expectations(ctx, only=[node.i]), FLOORS)
    rows = [row if r["i"] == node.i else r for r in h["rows"]]
    return summarize(rows, h["model"], "perturbed", FLOORS)


def _f32_bits(x: float) -> int:
    return int(np.array([x], dtype=np.float32).view(np.int32)[0])


def _src(cap: Capture, node: Node, k: int) -> np.ndarray:
    s = node.record["src"][k]
    return cap.data(cap.nodes[s["node"]])


# --- honest lane -------------------------------------------------------------------------------------------
def test_honest_capture_every_node_within_floor(honest: dict[str, Any]) -> None:
    sec = summarize(honest["rows"], honest["model"], "honest", FLOORS)
    assert sec["status"] == "pass", sec["diagnosis"]
    assert sec["first_failure"] is None
    assert sec["diagnosis"].startswith("rounding compounded: every op within floor")
    counts = sec["counts"]
    assert counts["checked"] >= 0.95 * counts["nodes"]  # only KV-cache write destinations are skipped
    assert set(counts["skipped_by_reason"]) == {"view of a leaf that attention does not read (a KV-cache destination)"}
    # every layer's quantized matmuls, the LM head, attention, RoPE, softmax and the cache views are checked
    per_op = sec["per_op"]
    assert per_op["MUL_MAT:Q4_1"]["nodes"] == 30 * 7
    assert per_op["MUL_MAT:Q8_0"]["nodes"] == 1 and per_op["GET_ROWS:Q8_0"]["nodes"] == 1
    for key in ("MUL_MAT:act-f32", "ROPE", "SOFT_MAX", "RMS_NORM", "SWIGLU", "SET_ROWS", "PERMUTE", "VIEW"):
        assert per_op[key]["nodes"] >= 30, key
    # agreement is at float32-rounding level, far below the floors
    assert per_op["MUL_MAT:Q4_1"]["worst"]["nmse"] < 1e-11
    assert per_op["SOFT_MAX"]["worst"]["nmse"] < 1e-13
    assert json.dumps(sec, sort_keys=True) == json.dumps(
        summarize(honest["rows"], honest["model"], "honest", FLOORS), sort_keys=True
    )


def test_kv_cache_views_hold_the_roped_keys(honest: dict[str, Any]) -> None:
    """The K view attention reads equals Kcur after RoPE for the sequence's cells (checked, not skipped)."""
    rows = {r["i"]: r for r in honest["rows"]}
    cap = honest["cap"]
    kview = next(n for n in cap.nodes if n.name == "cache_k_l5 (view) (permuted)")
    assert rows[kview.i]["verdict"] == "pass" and rows[kview.i]["note"].startswith("KV cache view: K of layer 5")
    # a corrupted cached key (one cell of layer 5) is caught at the view, not earlier
    data = cap.data(kview).copy()
    data[0, 1, 7, :] += 0.5
    sec = _recheck(honest, _perturbed(cap, kview, data), kview)
    assert sec["first_failure"]["name"] == kview.name and sec["first_failure"]["op"] == "PERMUTE"


# --- planted bugs -------------------------------------------------------------------------------------------
def _q4_1_without_min(x: np.ndarray, raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """sum_b d_x d_w sum(q_x q_w) with the block min m_w * s_x dropped (Q8_1 activations, x86 rounding)."""
    xb = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(xb).max(axis=2)
    dx = (amax / np.float32(127)).astype(np.float32)
    qx = np.rint(xb * np.where(amax > 0, np.float32(127) / amax, 0)[..., None].astype(np.float32))
    ax = (qx * dx.astype(np.float16).astype(np.float64)[..., None]).reshape(x.shape[0], cols)
    b = raw[: rows * cols // 32 * 20].reshape(-1, 20)
    dw = b[:, 0:2].copy().view("<f2").astype(np.float64)
    qw = np.concatenate([b[:, 4:] & 0x0F, b[:, 4:] >> 4], axis=1).astype(np.float64)
    return (ax @ (dw * qw).reshape(rows, cols).T).astype(np.float32)


def test_q4_1_min_term_dropped_in_one_node_fails_there(honest: dict[str, Any]) -> None:
    cap, model = honest["cap"], honest["model"]
    node = _node(cap, "ffn_out-3", "MUL_MAT")
    w = node.record["src"][0]["name"]
    assert w == "blk.3.ffn_down.weight"
    rows, cols = model.info(w).rows_cols
    x = _src(cap, node, 1).reshape(-1, cols)
    bad = _q4_1_without_min(x, model.raw(w), rows, cols)
    sec = check_kernels(_perturbed(cap, node, bad), model)  # the whole check, end to end
    first = sec["first_failure"]
    assert (first["i"], first["op"], first["weight_type"], first["weight"]) == (node.i, "MUL_MAT", "Q4_1", w)
    assert first["nmse"] > 1e3 * FLOORS["MUL_MAT:Q4_1"]
    assert sec["status"] == "fail"
    assert (
        sec["diagnosis"].startswith("Q4_1 vec_dot disagrees: NMSE ")
        and "at blk.3.ffn_down (floor 1e-11)" in sec["diagnosis"]
    )


@pytest.mark.parametrize(
    ("name", "op", "k", "param", "value", "model_key"),
    [
        ("norm-4", "RMS_NORM", 0, "eps", 1e-4, "eps"),
        ("Kcur-7", "ROPE", 5, "freq_base", 150000.0, "freq_base"),
        ("kq_soft_max-2", "SOFT_MAX", 0, "scale", 1 / np.sqrt(66.0), "scale"),
    ],
)
def test_engine_parameter_differing_from_the_model_fails_even_with_right_math(
    honest: dict[str, Any], name: str, op: str, k: int, param: str, value: float, model_key: str
) -> None:
    """The node's data is untouched (its math is right for the model's value); the engine's op_param is not."""
    cap = honest["cap"]
    node = _node(cap, name, op)
    sec = _recheck(honest, _perturbed(cap, node, op_params={k: _f32_bits(value)}), node)
    first = sec["first_failure"]
    assert (first["i"], first["op"]) == (node.i, op)
    assert first["nmse"] < FLOORS[op]  # the data agrees with the model ...
    (p,) = first["params"]  # ... the parameter does not: both values recorded
    assert p["param"] == param and p["engine"] == pytest.approx(value, rel=1e-6)
    expected_model = {"eps": 1e-5, "freq_base": 100000.0, "scale": 0.125}[model_key]
    assert p["model"] == pytest.approx(expected_model, rel=1e-6)
    assert sec["diagnosis"].startswith(f"{op} {param} differs from the model at {name}")


def test_mask_cell_flipped_fails_at_that_softmax(honest: dict[str, Any]) -> None:
    cap = honest["cap"]
    node = _node(cap, "kq_soft_max-6", "SOFT_MAX")
    kq = _src(cap, node, 0).astype(np.float64)[0]  # (H, T, n_kv)
    t, n_kv = kq.shape[1], kq.shape[2]
    mask = np.where(np.arange(n_kv)[None, :] <= np.arange(t)[:, None], 0.0, -np.inf)
    mask[:, t:] = -np.inf
    mask[3, 9] = 0.0  # token 3 sees the future cell 9
    s = kq * 0.125 + mask
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    bad = (e / e.sum(axis=-1, keepdims=True))[None]
    sec = _recheck(honest, _perturbed(cap, node, bad), node)
    first = sec["first_failure"]
    assert (first["i"], first["op"]) == (node.i, "SOFT_MAX") and not first["params"]
    assert first["nmse"] > 1e3 * FLOORS["SOFT_MAX"]


def test_silu_replaced_by_gelu_fails_at_that_node(honest: dict[str, Any]) -> None:
    cap = honest["cap"]
    node = _node(cap, "ffn_swiglu-11", "SWIGLU")
    gate, up = (_src(cap, node, k).astype(np.float64) for k in (0, 1))
    gelu = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate**3)))
    sec = _recheck(honest, _perturbed(cap, node, gelu * up), node)
    first = sec["first_failure"]
    assert (first["i"], first["op"]) == (node.i, "SWIGLU")
    assert first["nmse"] > 1e3 * FLOORS["SWIGLU"]
    # the same node labelled GEGLU by the engine (op_params[0] = 1) is a parameter failure too
    sec = _recheck(honest, _perturbed(cap, node, gelu * up, op_params={0: 1}), node)
    assert sec["first_failure"]["params"] == [{"param": "glu_op", "engine": "GEGLU", "model": "SWIGLU"}]


def _apply(h: dict[str, Any], name: str, op: str, fn: Callable[[np.ndarray], np.ndarray]) -> dict[str, Any]:
    node = _node(h["cap"], name, op)
    return _recheck(h, _perturbed(h["cap"], node, fn(h["cap"].data(node))), node)


def test_q8_0_dequantization_error_fails_at_the_embedding(honest: dict[str, Any]) -> None:
    """get_rows of token_embd (Q8_0) with one block's values scaled: the first node fails, typed Q8_0."""

    def scale_block(x: np.ndarray) -> np.ndarray:
        y = x.copy()
        y[..., 5, 32:64] *= 1.1
        return y

    sec = _apply(honest, "embd", "GET_ROWS", scale_block)
    first = sec["first_failure"]
    assert (first["i"], first["weight_type"]) == (0, "Q8_0")
    assert sec["diagnosis"].startswith("Q8_0 dequantization (get_rows) disagrees")


def test_section_is_deterministic_json(honest: dict[str, Any], tmp_path: Path) -> None:
    sec = summarize(honest["rows"], honest["model"], "e", FLOORS)
    text = json.dumps(sec, sort_keys=True)
    assert json.loads(text) == sec
    assert "nan" not in text.lower() and "infinity" not in text.lower()


# --- the other honest lanes (slow: a harness build, a fixture model) ---------------------------------------
@pytest.mark.slow
def test_honest_llama_2024_harness_every_node_within_floor(smol_path: str, tmp_path: Path) -> None:
    """The October-2024 tree through the harness (F16 V cache, CPY into the cache, kq over 32 padded cells)."""
    import os

    from parity_both.lanes.harness import HarnessLane
    from parity_both.provision.backends import BUILTIN_SPECS, provision_backend
    from parity_both.provision.harness import HarnessBuild

    cache = Path(os.environ.get("PARITY_BOTH_TEST_CACHE") or tmp_path / "cache")
    ident = provision_backend(BUILTIN_SPECS["llama-2024"], cache, tmp_path / "build.log", "auto")
    build = HarnessBuild.load(Path(ident["harness_path"]).parent.parent / "harness.json")
    lane = HarnessLane(build, smol_path, threads=2, n_ctx=64)
    py = LlamaCppPythonLane(smol_path, n_ctx=64, threads=1, vocab_only=True)
    try:
        ids = py.tokenize(TEXT, True)
        lane.eval_capture(ids, tmp_path / "h2024")
    finally:
        lane.close()
        py.close()
    sec = check_kernels(tmp_path / "h2024", smol_path)
    assert sec["status"] == "pass", sec["diagnosis"]
    assert sec["per_op"]["MUL_MAT:act-f16"]["nodes"] == 30  # kqv over the F16 V cache
    assert sec["per_op"]["CPY"]["nodes"] == 60


@pytest.mark.slow
def test_honest_bitnet_tq2_0_fixture_every_node_within_floor(tmp_path: Path) -> None:
    from parity_both.fixtures import write_fixture

    path = tmp_path / "bitnet_tq2_0.gguf"
    write_fixture(path, arch="bitnet", weight_type="TQ2_0", size="small", seed=5, scale_tensors=True)
    lane = LlamaCppPythonLane(str(path), n_ctx=64, threads=2)
    try:
        lane.eval_capture(
            [1, 17, 923, 4500, 33, 800, 1200, 77, 9, 3000, 12, 15, 18, 400, 500, 600] * 2, tmp_path / "bitnet"
        )
    finally:
        lane.close()
    sec = check_kernels(tmp_path / "bitnet", path)
    assert sec["status"] == "pass", sec["diagnosis"]
    assert sec["model"]["rope"]["type"] == "neox"
    assert sec["per_op"]["MUL_MAT:TQ2_0"]["nodes"] == 4 * 7


def _rewired(cap: Capture, node: Node, k: int, to: Node, data: np.ndarray) -> Capture:
    """The node reads source k from `to` (and holds `data`, consistent with that wiring)."""
    index = copy.deepcopy(dict(cap.index))
    index["nodes"][node.i]["src"][k].update(node=to.i, name=to.name, ne=list(to.ne))
    arrays = _Overlay(cap.arrays)
    arrays[node.key] = np.asarray(data, dtype=np.float32).reshape(arrays[node.key].shape)
    return Capture(index, arrays)


def test_residual_wired_to_the_layer_input_fails_at_that_add(honest: dict[str, Any]) -> None:
    """l_out-5 = ffn_out-5 + l_out-4 (the attention block dropped): each op right, the wiring not."""
    cap = honest["cap"]
    node, layer_in = _node(cap, "l_out-5", "ADD"), _node(cap, "l_out-4", "ADD")
    ffn_out = _src(cap, node, 0)
    sec = _recheck(honest, _rewired(cap, node, 1, layer_in, ffn_out + cap.data(layer_in)), node)
    first = sec["first_failure"]
    assert (first["i"], first["op"]) == (node.i, "ADD") and first["nmse"] == 0.0
    assert first["params"] == [{"param": "wiring", "engine": "l_out-4", "model": "ffn_inp-5"}]
    assert sec["diagnosis"].startswith("ADD wiring differs from the model at l_out-5")


def test_ffn_gate_and_up_swapped_fails_at_the_glu(honest: dict[str, Any]) -> None:
    cap = honest["cap"]
    node = _node(cap, "ffn_swiglu-2", "SWIGLU")
    gate, up = _node(cap, "ffn_gate-2", "MUL_MAT"), _node(cap, "ffn_up-2", "MUL_MAT")
    g, u = cap.data(gate).astype(np.float64), cap.data(up).astype(np.float64)
    swapped = _rewired(_rewired(cap, node, 0, up, u / (1 + np.exp(-u)) * g), node, 1, gate, u / (1 + np.exp(-u)) * g)
    sec = _recheck(honest, swapped, node)
    first = sec["first_failure"]
    assert first["i"] == node.i and first["nmse"] < FLOORS["SWIGLU"]
    assert [p["engine"] for p in first["params"]] == [
        "ffn_up-2 (blk.2.ffn_up.weight)",
        "ffn_gate-2 (blk.2.ffn_gate.weight)",
    ]


# --- planted bugs in real engines (slow: one October-2024 tree build per mutant) -----------------------------
# mutant (the mutation suite's table, tests/mutants) -> (model, first failing node, op, weight type, parameter)
MUTANT_EXPECTATIONS = {
    "q4_1-min-scaled": ("smol", "Qcur-0", "MUL_MAT", "Q4_1", None),
    "q4_1-scale-wrong-block": ("smol", "Qcur-0", "MUL_MAT", "Q4_1", None),
    "q8_0-dequant-wrong-block": ("smol", "inp_embd", "GET_ROWS", "Q8_0", None),
    "tq2_0-sign-flip": ("bitnet-tq2_0", None, "MUL_MAT", "TQ2_0", None),
    "rope-base": ("smol", "Qcur-0", "ROPE", None, "freq_base"),
    "kq-scale": ("smol", "kq_soft_max_ext-0", "SOFT_MAX", None, "scale"),
    "rms-eps": ("smol", "norm-0", "RMS_NORM", None, "eps"),
    "causal-mask": ("smol", "kq_soft_max_ext-0", "SOFT_MAX", None, None),
    "silu-gelu": ("smol", "ffn_silu-0", "GELU", None, "activation"),
    "ffn-gate-up-swap": ("smol", "ffn_silu-0", "SILU", None, "wiring"),
    "ffn-no-residual": ("smol", "l_out-0", "ADD", None, "wiring"),
}


@pytest.mark.slow
@pytest.mark.parametrize("mutant", sorted(MUTANT_EXPECTATIONS))
def test_planted_engine_bug_fails_at_its_node(mutant: str, smol_path: str, tmp_path: Path) -> None:
    from mutants import mutant_build  # the mutation suite's cached tree copies and builds

    from parity_both.fixtures import write_fixture
    from parity_both.lanes.harness import HarnessLane

    model_kind, name, op, weight_type, param = MUTANT_EXPECTATIONS[mutant]
    if model_kind == "smol":
        model = Path(smol_path)
        py = LlamaCppPythonLane(smol_path, n_ctx=64, threads=1, vocab_only=True)
        ids = py.tokenize(TEXT, True)
        py.close()
    else:
        model = tmp_path / "bitnet_tq2_0.gguf"
        write_fixture(model, arch="bitnet", weight_type="TQ2_0", size="small", seed=5)
        ids = [1, 17, 923, 4500, 33, 800, 1200, 77, 9, 3000, 12, 15, 18, 400, 500, 600] * 2
    lane = HarnessLane(mutant_build(mutant), model, threads=2, n_ctx=64)
    try:
        lane.eval_capture(ids, tmp_path / "capture")
    finally:
        lane.close()
    sec = check_kernels(tmp_path / "capture", model)
    first = sec["first_failure"]
    assert sec["status"] == "fail" and first is not None, sec["diagnosis"]
    assert first["op"] == op and first["weight_type"] == weight_type
    if name is not None:
        assert first["name"] == name
    assert (first["params"][0]["param"] if first["params"] else None) == param
    if param is None:
        assert first["nmse"] > 100 * first["floor"]
