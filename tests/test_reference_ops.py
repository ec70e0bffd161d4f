"""Unit checks of the reference's ops against direct float64 formulas and naive loops."""

from __future__ import annotations

import numpy as np

from parity_both.reference import ops


def test_rms_norm_and_its_trace() -> None:
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    w = np.linspace(0.5, 1.5, 64, dtype=np.float32)
    want = x / np.sqrt((x.astype(np.float64) ** 2).mean(1, keepdims=True) + 1e-5)
    seen = []
    got = ops.norm(ops.Trace(lambda name, op, a: seen.append((name, op, a.copy()))), 4, "ffn_norm", x, w, 1e-5)
    np.testing.assert_allclose(got, want * w, rtol=1e-6)
    assert got.dtype == np.float32
    assert [(n, op) for n, op, _ in seen] == [("norm-4", "RMS_NORM"), ("ffn_norm-4", "MUL")]
    np.testing.assert_allclose(seen[0][2], want, rtol=1e-6)
    assert np.array_equal(ops.norm(ops.NO_TRACE, 4, "ffn_norm", x, w, 1e-5), got)


def test_rope_angles_and_pairing() -> None:
    pos = np.array([0, 1, 7, 300])
    cos, sin = ops.rope_cos_sin(pos, 16, 10000.0)
    theta = pos[:, None] * 10000.0 ** (-np.arange(8) * 2 / 16)
    np.testing.assert_allclose(cos, np.cos(theta), atol=2e-4)  # ggml iterates theta in float32
    np.testing.assert_allclose(sin, np.sin(theta), atol=2e-4)
    np.testing.assert_array_equal(cos[0], 1.0)
    x = np.random.default_rng(1).standard_normal((4, 2, 16)).astype(np.float32)
    normal, neox = ops.rope(x, cos, sin, neox=False), ops.rope(x, cos, sin, neox=True)
    # normal rotates adjacent pairs (2i, 2i+1) by angle i; neox rotates (i, i+8)
    c, s = cos[2, 3], sin[2, 3]
    np.testing.assert_allclose(normal[2, 1, 6], x[2, 1, 6] * c - x[2, 1, 7] * s, rtol=1e-6)
    np.testing.assert_allclose(normal[2, 1, 7], x[2, 1, 6] * s + x[2, 1, 7] * c, rtol=1e-6)
    np.testing.assert_allclose(neox[2, 1, 3], x[2, 1, 3] * c - x[2, 1, 11] * s, rtol=1e-6)
    np.testing.assert_allclose(neox[2, 1, 11], x[2, 1, 3] * s + x[2, 1, 11] * c, rtol=1e-6)
    # rotations keep pair norms
    np.testing.assert_allclose(np.linalg.norm(normal, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_partial_rope_passes_the_tail_through() -> None:
    cos, sin = ops.rope_cos_sin(np.array([5]), 8, 10000.0)
    x = np.random.default_rng(2).standard_normal((1, 1, 16)).astype(np.float32)
    np.testing.assert_array_equal(ops.rope(x, cos, sin, neox=True)[..., 8:], x[..., 8:])


def test_softmax_and_silu() -> None:
    s = np.array([[1.0, 2.0, -np.inf, 3.0]], dtype=np.float32)
    p = ops.softmax(s)
    assert p[0, 2] == 0.0 and abs(p.sum() - 1) < 1e-6
    x = np.linspace(-20, 20, 41, dtype=np.float32)
    np.testing.assert_allclose(ops.silu(x), x / (1 + np.exp(-x.astype(np.float64))), rtol=1e-6, atol=1e-30)


def test_gqa_causal_attention_matches_a_naive_loop() -> None:
    rng = np.random.default_rng(3)
    T, n_past, H, Hkv, hd = 3, 4, 6, 2, 8
    q = rng.standard_normal((T, H, hd)).astype(np.float32)
    k = rng.standard_normal((n_past + T, Hkv, hd)).astype(np.float32)
    v = rng.standard_normal((n_past + T, Hkv, hd)).astype(np.float32)
    scale = 1 / np.sqrt(hd)
    want = np.zeros((T, H, hd))
    for t in range(T):
        for h in range(H):
            kv = h // (H // Hkv)
            sc = np.array([q[t, h] @ k[j, kv] * scale for j in range(n_past + t + 1)], dtype=np.float64)
            p = np.exp(sc - sc.max())
            p /= p.sum()
            want[t, h] = p @ v[: n_past + t + 1, kv]
    got = ops.attention(q, k, v, n_past, scale)
    np.testing.assert_allclose(got, want.reshape(T, H * hd), rtol=1e-5, atol=1e-6)
