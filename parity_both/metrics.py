"""Logit comparison metrics, defined as llama.cpp's own tools and the field define them.

Conventions (also written into every receipt, see METRIC_DEFINITIONS):
- P = softmax(reference logits), Q = softmax(lane logits), computed in float64.
- MSE is the MEAN of squared differences over the vocabulary (not the sum).
- NMSE = Σ(a−b)² / Σa² with a = reference (llama.cpp test-backend-ops).
- KL = Σ_v p(v)(log p(v) − log q(v)) over v with log p(v) > −16 (llama-perplexity --kl-divergence).
- Top-k agreement = |topk(a) ∩ topk(b)| / k, ties broken by the lower id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

TOPK = 5
KL_LOGP_FLOOR = -16.0

METRIC_DEFINITIONS: dict[str, str] = {
    "mse": "mean over the vocabulary of (ref - lane)^2, per position",
    "max_abs": "max over the vocabulary of |ref - lane|, per position",
    "nmse": "sum (ref - lane)^2 / sum ref^2 (llama.cpp test-backend-ops NMSE)",
    "cosine": "ref . lane / (|ref| |lane|), per position",
    "kl": "KL(P_ref || Q_lane) = sum_v p (log p - log q) over v with log p > -16, float64 "
    "(llama-perplexity --kl-divergence)",
    "topk_agree": f"|top{TOPK}(ref) & top{TOPK}(lane)| / {TOPK}, ties broken by lower token id",
    "same_top1": "argmax(ref) == argmax(lane) (llama-perplexity 'same top')",
    "delta_p": "q(next) - p(next) for the next token of the compared sequence (llama-perplexity dp)",
    "greedy": "for each generated position: does argmax(lane logits at the previous position) equal the "
    "reference's greedy token; vLLM-style containment: each side's token in the other's top-5",
}


def topk_ids(row: np.ndarray, k: int = TOPK) -> list[int]:
    """Top-k ids by descending logit, ties broken by the lower id (a stable sort on -x, over the few
    ids at or above the k-th largest value: the same ids in the same order as sorting the whole row)."""
    x = np.negative(row, dtype=np.float64)  # one pass; negation is exact, so the same values as -(float64)
    if k >= x.size or not np.isfinite(x).all():  # NaN/inf: the full sort defines their order
        return [int(i) for i in np.argsort(x, kind="stable")[:k]]
    kth = np.partition(x, k - 1)[k - 1]
    candidates = np.flatnonzero(x <= kth)  # ascending ids, every tie of the k-th value included
    order = np.argsort(x[candidates], kind="stable")
    return [int(i) for i in candidates[order[:k]]]


def log_softmax(x: np.ndarray) -> np.ndarray:
    """(x - max) - log(sum(exp(x - max))) in float64, computed in place on one copy: the same operations
    in the same order as the expression, without its four temporaries of the whole matrix."""
    y = np.array(x, dtype=np.float64)
    y -= y.max(axis=-1, keepdims=True)
    y -= np.log(np.exp(y).sum(axis=-1, keepdims=True))
    return y


@dataclass(frozen=True)
class PositionMetrics:
    pos: int
    token_id: int
    mse: float
    max_abs: float
    nmse: float
    cosine: float
    kl: float
    topk_agree: float
    same_top1: bool
    top5_ref: list[int]
    top5_lane: list[int]
    delta_p: float | None

    def as_row(self) -> dict[str, Any]:
        return {
            "pos": self.pos,
            "token_id": self.token_id,
            "mse": self.mse,
            "max_abs": self.max_abs,
            "nmse": self.nmse,
            "cosine": self.cosine,
            "kl": self.kl,
            "topk_agree": self.topk_agree,
            "same_top1": self.same_top1,
            "top5_ref": self.top5_ref,
            "top5_lane": self.top5_lane,
            "delta_p": self.delta_p,
        }


def compare_positions(ref: np.ndarray, lane: np.ndarray, ids: list[int]) -> list[PositionMetrics]:
    """Per-position metrics for two [n, vocab] logit matrices of the same id sequence."""
    if ref.shape != lane.shape:
        raise ValueError(f"logit shapes differ: reference {ref.shape}, lane {lane.shape}")
    a = ref.astype(np.float64)
    b = lane.astype(np.float64)
    d = a - b
    lp, lq = log_softmax(a), log_softmax(b)
    p = np.exp(lp)
    out = []
    for i in range(a.shape[0]):
        mask = lp[i] > KL_LOGP_FLOOR
        kl = float(np.sum(p[i, mask] * (lp[i, mask] - lq[i, mask])))
        na, nb = np.linalg.norm(a[i]), np.linalg.norm(b[i])
        cos = float(a[i] @ b[i] / (na * nb)) if na > 0 and nb > 0 else float("nan")
        ta, tb = topk_ids(a[i]), topk_ids(b[i])
        nxt = ids[i + 1] if i + 1 < len(ids) else None
        dp = float(np.exp(lq[i, nxt]) - p[i, nxt]) if nxt is not None else None
        out.append(
            PositionMetrics(
                pos=i,
                token_id=int(ids[i]),
                mse=float(np.mean(d[i] ** 2)),
                max_abs=float(np.max(np.abs(d[i]))),
                nmse=float(np.sum(d[i] ** 2) / max(np.sum(a[i] ** 2), 1e-300)),
                cosine=cos,
                kl=max(kl, 0.0),
                topk_agree=len(set(ta) & set(tb)) / TOPK,
                same_top1=ta[0] == tb[0],
                top5_ref=ta,
                top5_lane=tb,
                delta_p=dp,
            )
        )
    return out


def greedy_agreement(ref: np.ndarray, lane: np.ndarray, ids: list[int], n_prompt: int) -> dict[str, Any]:
    """Greedy-decode parity under teacher forcing: the reference generated ids[n_prompt:]; at each of
    those steps, what would the lane have picked?"""
    steps = []
    for j in range(n_prompt, len(ids)):
        i = j - 1  # logits after ids[: j] predict ids[j]
        ref_tok = int(ids[j])
        lane_tok = int(topk_ids(lane[i], 1)[0])
        steps.append(
            {
                "step": j - n_prompt,
                "pos": j,
                "ref_token": ref_tok,
                "lane_token": lane_tok,
                "match": lane_tok == ref_tok,
                "contained": ref_tok in topk_ids(lane[i]) and lane_tok in topk_ids(ref[i]),
            }
        )
    n = len(steps)
    first = next((s["step"] for s in steps if not s["match"]), None)
    return {
        "steps": steps,
        "n_generated": n,
        "exact_match_rate": (sum(s["match"] for s in steps) / n) if n else None,
        "first_divergent_step": first,
        "all_contained": all(s["contained"] for s in steps),
    }


def percentiles(x: np.ndarray) -> dict[str, float]:
    if x.size == 0:
        return {}
    qs = {"max": 100, "p99": 99, "p95": 95, "p90": 90, "median": 50, "p10": 10, "min": 0}
    return {k: float(np.percentile(x, q)) for k, q in qs.items()}


def aggregate(rows: list[PositionMetrics], ref: np.ndarray, lane: np.ndarray) -> dict[str, Any]:
    n = len(rows)
    kl = np.array([r.kl for r in rows])
    same = sum(r.same_top1 for r in rows)
    d = ref.astype(np.float64) - lane.astype(np.float64)
    dps = np.array([r.delta_p for r in rows if r.delta_p is not None])
    return {
        "positions": n,
        "mean_mse": float(np.mean([r.mse for r in rows])) if n else None,
        "max_abs": float(max(r.max_abs for r in rows)) if n else None,
        "nmse": float(np.sum(d**2) / max(np.sum(ref.astype(np.float64) ** 2), 1e-300)) if n else None,
        "mean_cosine": float(np.mean([r.cosine for r in rows])) if n else None,
        "min_cosine": float(min(r.cosine for r in rows)) if n else None,
        "mean_kl": float(kl.mean()) if n else None,
        "kl_stderr": float(np.sqrt(max(np.mean(kl**2) - kl.mean() ** 2, 0.0) / (n - 1))) if n > 1 else None,
        "kl_percentiles": percentiles(kl),
        "mean_topk_agree": float(np.mean([r.topk_agree for r in rows])) if n else None,
        "same_top1": {"count": int(same), "of": n, "rate": same / n if n else None},
        "mean_delta_p": float(dps.mean()) if dps.size else None,
        "rms_delta_p": float(np.sqrt(np.mean(dps**2))) if dps.size else None,
    }
