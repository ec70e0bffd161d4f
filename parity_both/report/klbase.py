"""llama.cpp-compatible KL-divergence base files (`llama-perplexity --kl-divergence-base`).

Format (examples/perplexity/perplexity.cpp of the October-2024 tree, functions perplexity/kl_divergence):
  "_logits_", u32 n_ctx, i32 n_vocab, i32 n_chunk, i32 tokens[n_ctx * n_chunk], then per chunk
  (n_ctx - 1 - n_ctx/2) rows of nv = 2*((n_vocab+1)/2) + 4 uint16: the first 4 hold two float32
  (scale, min_log_prob), the rest the log-probs quantized as
      min' = max(min_logit, max_logit - 16), scale = (max_logit - min')/65535,
      q[i] = logit[i] > min' ? nearest_int((logit[i] - min') / scale) : 0,  min_log_prob = min' - max - log Σexp.
  Row j of chunk c holds the distribution at position n_ctx/2 + j, which predicts token n_ctx/2 + j + 1:
  positions n_ctx/2 ... n_ctx-2 are scored (llama-perplexity scores the second half of each chunk).

`--kl-divergence` then computes per scored position KLD = Σ_{v: log p_v > -16} p_v (log p_v - log q_v), P from
the file (dequantized as scale*q + min_log_prob, not renormalised) and Q the tested model's float logits.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"_logits_"
LOGP_FLOOR = -16.0  # perplexity.cpp: entries with log p <= -16 are left out of the KL sum


def row_width(n_vocab: int) -> int:
    return 2 * ((n_vocab + 1) // 2) + 4


def scored_positions(n_ctx: int) -> range:
    """The positions of a chunk whose distributions the base file holds (and llama-perplexity scores)."""
    return range(n_ctx // 2, n_ctx - 1)


def quantize_row(logits: np.ndarray) -> np.ndarray:
    """One row of the file: perplexity.cpp's log_softmax(n_vocab, logits, uint16*, tok), in float32 as there."""
    x = np.asarray(logits, dtype=np.float32)
    n_vocab = x.shape[0]
    out = np.zeros(row_width(n_vocab), dtype=np.uint16)
    max_logit = np.float32(x.max())
    min_logit = np.float32(max(np.float32(x.min()), np.float32(max_logit - np.float32(16))))
    sum_exp = float(np.exp((x - max_logit).astype(np.float32), dtype=np.float32).astype(np.float64).sum())
    log_sum_exp = np.float32(np.log(sum_exp))
    min_log_prob = np.float32(min_logit - max_logit - log_sum_exp)
    scale = np.float32((max_logit - min_logit) / np.float32(65535))
    out[:4] = np.frombuffer(struct.pack("<ff", scale, min_log_prob), dtype=np.uint16)
    if scale:
        inv = np.float32(1) / scale
        v = np.rint((inv * (x - min_logit)).astype(np.float32))  # nearest_int: round half to even
        out[4 : 4 + n_vocab] = np.where(x > min_logit, v, 0).astype(np.uint16)
    return out


def write_kl_base(path: Path | str, chunks_tokens: list[list[int]], chunks_logits: list[np.ndarray]) -> Path:
    """Write the base file for chunks of equal length n_ctx: tokens[c] (n_ctx ids) and logits[c] (n_ctx x n_vocab
    float, row t = the distribution after token t)."""
    if not chunks_tokens or len(chunks_tokens) != len(chunks_logits):
        raise ValueError("need one logits array per chunk and at least one chunk")
    n_ctx = len(chunks_tokens[0])
    n_vocab = int(np.asarray(chunks_logits[0]).shape[1])
    for toks, lg in zip(chunks_tokens, chunks_logits, strict=True):
        if len(toks) != n_ctx or np.asarray(lg).shape != (n_ctx, n_vocab):
            raise ValueError(f"every chunk must be {n_ctx} tokens with ({n_ctx}, {n_vocab}) logits")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<Iii", n_ctx, n_vocab, len(chunks_tokens)))
        f.write(np.asarray([t for c in chunks_tokens for t in c], dtype="<i4").tobytes())
        for lg in chunks_logits:
            arr = np.asarray(lg, dtype=np.float32)
            for pos in scored_positions(n_ctx):
                f.write(quantize_row(arr[pos]).astype("<u2").tobytes())
    tmp.replace(path)
    return path


@dataclass
class KLBase:
    n_ctx: int
    n_vocab: int
    tokens: np.ndarray  # (n_chunk, n_ctx) int32
    log_probs: np.ndarray  # (n_chunk, n_scored, n_vocab) float32, dequantized as llama-perplexity does


def read_kl_base(path: Path | str) -> KLBase:
    data = Path(path).read_bytes()
    if data[:8] != MAGIC:
        raise ValueError(f"{path} is not a llama-perplexity logits file (no _logits_ magic)")
    n_ctx, n_vocab, n_chunk = struct.unpack_from("<Iii", data, 8)
    off = 20
    tokens = np.frombuffer(data, dtype="<i4", count=n_ctx * n_chunk, offset=off).reshape(n_chunk, n_ctx)
    off += 4 * n_ctx * n_chunk
    nv, n_scored = row_width(n_vocab), len(scored_positions(n_ctx))
    rows = np.frombuffer(data, dtype="<u2", count=n_chunk * n_scored * nv, offset=off).reshape(n_chunk, n_scored, nv)
    head = np.ascontiguousarray(rows[..., :4]).view("<f4")  # (n_chunk, n_scored, 2)
    scale, min_lp = head[..., 0:1], head[..., 1:2]
    log_probs = (scale * rows[..., 4 : 4 + n_vocab].astype(np.float32) + min_lp).astype(np.float32)
    return KLBase(int(n_ctx), int(n_vocab), tokens.astype(np.int32), log_probs)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def kl_per_position(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """Exact KL(P || Q) per row in float64 from unquantized logits (our metric)."""
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


def kl_from_base(base: KLBase, q_logits: list[np.ndarray]) -> np.ndarray:
    """llama-perplexity's per-position KLD from the base file and the tested model's full-chunk logits
    (one (n_ctx, n_vocab) array per chunk): the sum over v with log p_v > -16, P not renormalised."""
    out = []
    pos = list(scored_positions(base.n_ctx))
    for c, q in enumerate(q_logits):
        lq = log_softmax(np.asarray(q)[pos])
        lp = base.log_probs[c].astype(np.float64)
        keep = lp > LOGP_FLOOR
        out.append(np.where(keep, np.exp(lp) * (lp - lq), 0.0).sum(axis=-1))
    return np.concatenate(out)
