"""Metrics against straightforward re-implementations (pure Python, float64)."""

from __future__ import annotations

import math

import numpy as np

from parity_both import metrics


def _softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    s = sum(e)
    return [x / s for x in e]


def test_position_metrics_match_naive():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 50)).astype(np.float32) * 3
    b = (a + rng.normal(size=a.shape).astype(np.float32) * 0.1).astype(np.float32)
    ids = [3, 7, 11, 13]
    rows = metrics.compare_positions(a, b, ids)
    for i, r in enumerate(rows):
        ra, rb = [float(x) for x in a[i]], [float(x) for x in b[i]]
        n = len(ra)
        assert math.isclose(r.mse, sum((x - y) ** 2 for x, y in zip(ra, rb, strict=True)) / n, rel_tol=1e-12)
        assert math.isclose(r.max_abs, max(abs(x - y) for x, y in zip(ra, rb, strict=True)), rel_tol=1e-12)
        p, q = _softmax(ra), _softmax(rb)
        kl = sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True) if math.log(pi) > -16)
        assert math.isclose(r.kl, kl, rel_tol=1e-9, abs_tol=1e-15)
        dot = sum(x * y for x, y in zip(ra, rb, strict=True))
        cos = dot / math.sqrt(sum(x * x for x in ra) * sum(y * y for y in rb))
        assert math.isclose(r.cosine, cos, rel_tol=1e-12)
        sq = sum((x - y) ** 2 for x, y in zip(ra, rb, strict=True))
        assert math.isclose(r.nmse, sq / sum(x * x for x in ra), rel_tol=1e-12)
        top_a = sorted(range(n), key=lambda j: (-ra[j], j))[:5]
        top_b = sorted(range(n), key=lambda j: (-rb[j], j))[:5]
        assert r.top5_ref == top_a and r.top5_lane == top_b
        assert r.topk_agree == len(set(top_a) & set(top_b)) / 5
        if i + 1 < len(ids):
            assert math.isclose(r.delta_p, q[ids[i + 1]] - p[ids[i + 1]], rel_tol=1e-9, abs_tol=1e-15)


def test_mse_is_a_mean_not_a_sum():
    a = np.zeros((1, 10), np.float32)
    b = np.ones((1, 10), np.float32)
    assert metrics.compare_positions(a, b, [0])[0].mse == 1.0


def test_topk_ties_break_by_lower_id():
    row = np.array([1.0, 5.0, 5.0, 5.0, 0.0, 5.0, 5.0, 5.0], np.float32)
    assert metrics.topk_ids(row) == [1, 2, 3, 5, 6]


def test_topk_equals_the_full_stable_sort_on_ties_nan_inf_and_signed_zeros():
    """topk_ids partially sorts; the definition is a stable descending sort of the whole row."""
    rng = np.random.default_rng(7)
    for trial in range(400):
        n = int(rng.integers(1, 40))
        row = rng.integers(-2, 3, size=n).astype(np.float32) if trial % 2 else rng.normal(size=n).astype(np.float32)
        for special in (np.nan, np.inf, -np.inf, -0.0)[: trial % 5]:
            row[int(rng.integers(0, n))] = special
        for k in (1, 5):
            full = [int(i) for i in np.argsort(-row.astype(np.float64), kind="stable")[:k]]
            assert metrics.topk_ids(row, k) == full, (row, k)


def test_identical_logits_are_perfect():
    a = np.random.default_rng(1).normal(size=(3, 20)).astype(np.float32)
    rows = metrics.compare_positions(a, a.copy(), [1, 2, 3])
    assert all(r.kl == 0 and r.mse == 0 and r.same_top1 and r.topk_agree == 1 for r in rows)
    agg = metrics.aggregate(rows, a, a)
    assert agg["nmse"] == 0 and agg["same_top1"]["rate"] == 1.0


def test_greedy_agreement_teacher_forced():
    ref = np.zeros((4, 6), np.float32)
    lane = np.zeros((4, 6), np.float32)
    ids = [0, 1, 2, 3]  # prompt = first 2 ids, generated = ids[2:]
    ref[1, 2] = ref[2, 3] = 5
    lane[1, 2] = 5
    lane[2, 4] = 5
    lane[2, 3] = 4  # the reference token is still second for the lane
    g = metrics.greedy_agreement(ref, lane, ids, n_prompt=2)
    assert [s["match"] for s in g["steps"]] == [True, False]
    assert g["exact_match_rate"] == 0.5 and g["first_divergent_step"] == 1
    assert g["all_contained"] is True


def test_log_softmax_in_place_equals_the_textbook_expression_bit_for_bit():
    """The in-place log_softmax gives exactly the bits of x - max - log(sum(exp(x - max))) (float64)."""
    rng = np.random.default_rng(3)
    for dt in (np.float32, np.float64):
        x = (rng.standard_normal((16, 1031)) * 9).astype(dt)
        x64 = x.astype(np.float64)
        m = x64.max(axis=-1, keepdims=True)
        expected = x64 - m - np.log(np.exp(x64 - m).sum(axis=-1, keepdims=True))
        assert np.array_equal(metrics.log_softmax(x).view(np.int64), expected.view(np.int64))
