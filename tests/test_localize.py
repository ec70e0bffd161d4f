"""Localization on captures whose departure point is planted by the test (the expectation is where the test put
it, not what the code computes), and corpus windows against hand-written expectations."""

from __future__ import annotations

import numpy as np
import pytest

from parity_both.capture import Capture, load_capture, save_capture
from parity_both.compare.localize import localize, node_difference
from parity_both.corpus import corpus_windows, windows_of
from parity_both.pipeline import InputError


def _capture(names: list[str], arrays: list[np.ndarray]) -> Capture:
    nodes, data = [], {}
    for i, (name, a) in enumerate(zip(names, arrays, strict=True)):
        key = f"n{i:04d}"
        nodes.append(
            {
                "i": i,
                "key": key,
                "name": name,
                "op": "ADD",
                "ne": list(a.shape[::-1]),
                "type": "f32",
                "op_params": [],
                "src": [],
            }
        )
        data[key] = a
    return Capture({"schema": "parity-both/capture/1", "engine": "test", "n_tokens": 4, "nodes": nodes}, data)


NAMES = ["inp_embd"] + [
    f"{b}-{i}" for i in range(3) for b in ("attn_norm", "Qcur", "Qcur", "kqv_out", "ffn_out", "l_out")
]


def _pair(plant_at: int | None, size: float = 1e-2, seed: int = 0) -> tuple[Capture, Capture]:
    rng = np.random.default_rng(seed)
    ref = [rng.standard_normal((4, 8)).astype(np.float32) for _ in NAMES]
    lane = [a + np.float32(1e-7) * rng.standard_normal(a.shape).astype(np.float32) for a in ref]
    if plant_at is not None:
        for k in range(plant_at, len(NAMES)):  # a departure propagates downstream
            lane[k] = lane[k] + np.float32(size) * rng.standard_normal(lane[k].shape).astype(np.float32)
    return _capture(NAMES, ref), _capture(NAMES, lane)


@pytest.mark.parametrize("plant_at", [1, 3, 9, 14])
def test_first_departing_node_is_where_it_was_planted(plant_at: int) -> None:
    ref, lane = _pair(plant_at)
    loc = localize(ref, lane, floor=1e-8)
    name = NAMES[plant_at]
    assert loc["status"] == "departs"
    assert loc["first_node"]["name"] == name
    assert loc["first_node"]["occurrence"] == NAMES[:plant_at].count(name)
    assert loc["first_layer"] == int(name.rsplit("-", 1)[1])


def test_honest_pair_stays_within_floor() -> None:
    ref, lane = _pair(None)
    loc = localize(ref, lane, floor=1e-8)
    assert loc["status"] == "within_floor" and loc["first_node"] is None and loc["first_layer"] is None
    assert len(loc["layers"]) == 3 and all(e["l_out_nmse"] < 1e-10 for e in loc["layers"])


def test_second_occurrence_of_a_name_is_paired_in_order() -> None:
    ref, lane = _pair(3)  # NAMES[3] is the second Qcur-0 (after RoPE)
    loc = localize(ref, lane, floor=1e-8)
    assert (loc["first_node"]["name"], loc["first_node"]["occurrence"]) == ("Qcur-0", 1)


def test_padded_kv_axis_is_cut_to_the_reference() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.zeros((3, 32), np.float32)
    b[:, :4] = a
    d = node_difference(a, b)
    assert d["nmse"] == 0.0 and "cut" in d["note"]
    assert node_difference(np.ones((3, 4)), np.ones((2, 5))) is None
    four = np.zeros((1, 3, 32), np.float32)  # the lane keeps ggml's ne[3] = 1, the reference does not
    four[0, :, :4] = a
    assert node_difference(a, four)["nmse"] == 0.0


def test_capture_round_trip(tmp_path) -> None:
    ref, _ = _pair(None)
    save_capture(tmp_path / "c", ref.index, dict(ref.arrays))
    back = load_capture(tmp_path / "c")
    assert [n.name for n in back.nodes] == NAMES
    assert all(np.array_equal(back.data(n), ref.data(n)) for n in back.nodes)
    assert not list(tmp_path.glob(".*tmp*"))


def test_corpus_windows() -> None:
    body = list(range(100, 120))
    assert corpus_windows(body, 5, 3, bos_id=1) == [
        [1, 100, 101, 102, 103],
        [1, 104, 105, 106, 107],
        [1, 108, 109, 110, 111],
    ]
    assert corpus_windows(body, 5, 2, bos_id=None) == [[100, 101, 102, 103, 104], [105, 106, 107, 108, 109]]
    with pytest.raises(InputError, match="fewer than 6 window"):
        corpus_windows(body, 5, 6, bos_id=None)
    prompt = {"window_starts": [0, 5]}
    assert windows_of(prompt, list(range(10))) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert windows_of({}, [7, 8]) == [[7, 8]]
