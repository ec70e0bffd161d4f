"""KL base files in llama-perplexity's format: the layout read back byte by byte, and the proof: llama-perplexity
(built from the llama-2024 lane's tree) run with --kl-divergence against our file of the reference's logits
reproduces the mean KL of our receipt over the same scored positions."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from parity_both.report.klbase import read_kl_base, write_kl_base

from conftest import REPO, snakemake, write_config

DELTA = 16 / 65535 / 2  # the largest rounding of a quantized log-prob: half a step of a 16-nat range in 65535 steps


def _log_softmax64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def test_layout_read_back_byte_by_byte(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n_ctx, n_vocab = 8, 11  # odd vocabulary: each row is padded to an even count
    tokens = [list(rng.integers(0, n_vocab, n_ctx)) for _ in range(2)]
    logits = [rng.normal(0, 6, (n_ctx, n_vocab)).astype(np.float32) for _ in range(2)]
    path = write_kl_base(tmp_path / "base.bin", tokens, logits)
    data = path.read_bytes()
    assert data[:8] == b"_logits_"
    assert struct.unpack_from("<Iii", data, 8) == (n_ctx, n_vocab, 2)
    assert list(struct.unpack_from(f"<{2 * n_ctx}i", data, 20)) == [int(t) for c in tokens for t in c]
    nv, scored = 2 * ((n_vocab + 1) // 2) + 4, n_ctx - 1 - n_ctx // 2
    off = 20 + 4 * 2 * n_ctx
    assert len(data) == off + 2 * scored * nv * 2
    for c in range(2):
        for j in range(scored):
            row = off + 2 * nv * (c * scored + j)
            scale, min_lp = struct.unpack_from("<ff", data, row)
            q = np.array(struct.unpack_from(f"<{n_vocab}H", data, row + 8), dtype=np.float64)
            exact = _log_softmax64(logits[c][n_ctx // 2 + j])  # row j: the position n_ctx/2 + j
            kept = exact > exact.max() - 16
            assert np.abs(scale * q + min_lp - exact)[kept].max() <= DELTA + 1e-5
    base = read_kl_base(path)
    assert base.log_probs.shape == (2, scored, n_vocab) and base.tokens.tolist() == tokens


@pytest.mark.slow
def test_llama_perplexity_reproduces_our_mean_kl(tmp_path: Path, smol_path: str) -> None:
    from parity_both.report.perplexity_tool import ensure_perplexity, run_kl_divergence

    window = 256
    write_config(
        tmp_path,
        {
            "models": {"smollm2": {"gguf": "embedded", "twin": False}},
            "prompts": {"readme": {"corpus": str(REPO / "README.md"), "window": window, "windows": 1}},
            "lanes": ["llama-2024"],
        },
    )
    res = tmp_path / "results" / "smollm2"
    snakemake(tmp_path, "results/smollm2/kl-base/readme.bin", "results/smollm2/receipts/llama-2024/readme.json")
    receipt = json.loads((res / "receipts" / "llama-2024" / "readme.json").read_text())
    scored = range(window // 2, window - 1)  # what llama-perplexity scores: positions n_ctx/2 .. n_ctx-2
    kl = {r["pos"]: r["kl"] for r in receipt["quantized"]["rows"]}
    ours = float(np.mean([kl[p] for p in scored]))

    tool = run_kl_divergence(ensure_perplexity(), Path(smol_path), res / "kl-base" / "readme.bin", window)
    # Tolerance: the file stores log p rounded to within DELTA (uint16 steps), which moves each position's
    # KL = sum p (log p - log q) by at most DELTA * (1 + sum p |log p - log q|); plus the 6 printed decimals.
    ref = _log_softmax64(np.load(res / "reference" / "readme.npz")["logits"][list(scored)])
    lane = _log_softmax64(np.load(res / "lanes" / "llama-2024" / "readme.npz")["logits"][list(scored)])
    spread = float((np.exp(ref) * np.abs(ref - lane)).sum(axis=-1).max())
    tol = DELTA * (1 + spread) + 1e-6
    assert abs(tool["mean_kld"] - ours) <= tol, (tool["mean_kld"], ours, tol)
    assert ours > 10 * tol  # a real divergence (Q4_1 vs the exact reference), not two zeros agreeing
