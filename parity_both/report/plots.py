"""Plots of one receipt (matplotlib, Agg): per-position KL / max|delta logit| / top-1 agreement for both
verdicts, and per-layer NMSE + worst nodes when the receipt carries localization or kernel checks.
Plus the run's summary table (HTML) from summary.json. Used by rules/plots.smk (scripts/plot_receipt.py,
scripts/report_table.py)."""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

VERDICTS = ("quantized", "graph")
COLORS = {"quantized": "tab:blue", "graph": "tab:orange"}
FLOOR = 1e-12  # log-scale floor: a KL or NMSE of exactly 0 is drawn here


def _rows(section: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    if not section or section.get("status") == "skipped":
        return []
    return list(section.get("rows") or [])


def _series(rows: list[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pos = np.array([r["pos"] for r in rows if r.get(key) is not None], dtype=float)
    val = np.array([r[key] for r in rows if r.get(key) is not None], dtype=float)
    return pos, val


def n_prompt(receipt: Mapping[str, Any]) -> int | None:
    for v in VERDICTS:
        seq = (receipt.get(v) or {}).get("sequence") or {}
        if seq.get("n_prompt") is not None and seq.get("n_generated"):
            return int(seq["n_prompt"])
    return None


def _label(section: Mapping[str, Any] | None, which: str) -> str:
    status = (section or {}).get("status", "missing")
    reason = f": {section['reason']}" if status == "skipped" and section.get("reason") else ""
    return f"{which} ({status}{reason})"[:80]


def _mark_generated(ax, start: int | None, end: float) -> None:
    if start is not None:
        ax.axvspan(start - 0.5, end + 0.5, color="0.9", zorder=0, label="generated" if ax.get_label() == "" else None)


def plot_positions(receipt: Mapping[str, Any], out: Path | str) -> Path:
    """KL and max|delta logit| per position (log scale) and the top-1 agreement strip, both verdicts."""
    fig, axes = plt.subplots(3, 1, figsize=(10, 7.5), sharex=True, gridspec_kw={"height_ratios": [3, 3, 1.2]})
    start = n_prompt(receipt)
    last = max([r["pos"] for v in VERDICTS for r in _rows(receipt.get(v))] or [0])
    for ax, key, title in (
        (axes[0], "kl", "KL(P_ref || Q_lane) per position"),
        (axes[1], "max_abs", "max |logit_ref - logit_lane| per position"),
    ):
        _mark_generated(ax, start, last)
        for v in VERDICTS:
            pos, val = _series(_rows(receipt.get(v)), key)
            if pos.size:
                ax.plot(
                    pos,
                    np.maximum(val, FLOOR),
                    marker=".",
                    ms=3,
                    lw=1,
                    color=COLORS[v],
                    label=_label(receipt.get(v), v),
                )
            thr = ((receipt.get(v) or {}).get("thresholds") or {}).get("kl_max") if key == "kl" else None
            if thr is not None and pos.size:
                ax.axhline(thr, color=COLORS[v], ls="--", lw=0.8, label=f"{v} kl_max {thr:g}")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    strip = np.full((len(VERDICTS), last + 1), np.nan)
    for i, v in enumerate(VERDICTS):
        for r in _rows(receipt.get(v)):
            if r.get("same_top1") is not None:
                strip[i, r["pos"]] = 1.0 if r["same_top1"] else 0.0
    cmap = matplotlib.colors.ListedColormap(["tab:red", "tab:green"])
    cmap.set_bad("0.85")
    axes[2].imshow(
        np.ma.masked_invalid(strip),
        aspect="auto",
        cmap=cmap,
        vmin=0,
        vmax=1,
        interpolation="nearest",
        extent=(-0.5, last + 0.5, len(VERDICTS) - 0.5, -0.5),
    )
    axes[2].set_yticks(range(len(VERDICTS)), VERDICTS, fontsize=8)
    axes[2].set_title("top-1 agreement (green: same argmax, red: differs, grey: not evaluated)", fontsize=10)
    if start is not None:
        axes[2].axvline(start - 0.5, color="k", lw=1)
    axes[2].set_xlabel("position" + (f" (generated from {start})" if start is not None else ""))
    name = (
        f"{receipt.get('model_name') or receipt.get('model')} / {receipt.get('backend')} / "
        f"{receipt.get('prompt_name') or receipt.get('prompt')}"
    )
    fig.suptitle(f"{name}: {receipt.get('status')}", fontsize=11)
    return _save(fig, out)


def _layer_panel(ax, loc: Mapping[str, Any]) -> None:
    layers = loc.get("layers") or []
    x = [e["layer"] for e in layers]
    for key, color in (
        ("l_out_nmse", "k"),
        ("kqv_out_nmse", "tab:purple"),
        ("ffn_out_nmse", "tab:green"),
        ("worst_nmse", "tab:red"),
    ):
        y = [max(e.get(key) or 0.0, FLOOR) for e in layers]
        ax.plot(x, y, marker="o", ms=3, lw=1, color=color, label=key.removesuffix("_nmse"))
    if loc.get("floor_nmse") is not None:
        ax.axhline(loc["floor_nmse"], color="0.5", ls="--", lw=0.8, label=f"floor {loc['floor_nmse']:g}")
    if loc.get("first_layer") is not None:
        ax.axvline(loc["first_layer"], color="tab:red", ls=":", lw=1, label=f"first layer {loc['first_layer']}")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    first = (loc.get("first_node") or {}).get("name")
    ax.set_title(
        f"per-layer NMSE ({loc.get('status', '?')}" + (f", departs at {first}" if first else "") + ")", fontsize=10
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _worst_panel(ax, items: list[tuple[str, float, float | None]], title: str) -> None:
    items = items[:10][::-1]
    y = np.arange(len(items))
    ax.barh(y, [max(v, FLOOR) for _, v, _ in items], color="tab:red", alpha=0.7)
    for i, (_, _, floor) in enumerate(items):
        if floor:
            ax.plot([floor, floor], [i - 0.4, i + 0.4], color="k", lw=1.5)
    ax.set_yticks(y, [n for n, _, _ in items], fontsize=7)
    ax.set_xscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="x")


def plot_layers(receipt: Mapping[str, Any], out: Path | str) -> Path:
    """Per-layer NMSE and worst nodes (localization), worst node per op vs its floor (kernels); a figure that
    says so when the receipt has neither."""
    loc, ker = receipt.get("localization"), receipt.get("kernels")
    panels = [p for p in (("loc", loc), ("worst", loc), ("kernels", ker)) if p[1]]
    if not panels:
        fig, ax = plt.subplots(figsize=(8, 1.6))
        ax.axis("off")
        ax.text(
            0.5,
            0.5,
            "this receipt has no localization or kernel checks\n(the run did not capture graphs)",
            ha="center",
            va="center",
            fontsize=11,
        )
        return _save(fig, out)
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.6 * len(panels)), squeeze=False)
    for ax, (kind, data) in zip(axes[:, 0], panels, strict=True):
        if kind == "loc":
            _layer_panel(ax, data)
        elif kind == "worst":
            items = [
                (f"{w['name']}#{w.get('occurrence', 0)} ({w.get('op')})", w["nmse"], None)
                for w in data.get("worst_nodes") or []
                if w.get("nmse") is not None
            ]
            _worst_panel(ax, items, "worst nodes by NMSE (localization)")
        else:
            per_op = data.get("per_op") or {}
            items = sorted(
                (
                    (f"{k}: {v['worst'].get('name')}", v["worst"].get("nmse") or 0.0, v.get("floor"))
                    for k, v in per_op.items()
                    if v.get("worst")
                ),
                key=lambda t: -(t[1] / (t[2] or 1.0)),
            )
            _worst_panel(ax, items, f"kernel checks: worst node per op vs floor (black) - {data.get('status')}")
    fig.suptitle(
        f"{receipt.get('model_name') or receipt.get('model')} / {receipt.get('backend')} / "
        f"{receipt.get('prompt_name') or receipt.get('prompt')}",
        fontsize=11,
    )
    return _save(fig, out)


def _save(fig, out: Path | str) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=90, metadata={"Software": None})  # no version/time stamp: same receipt, same bytes
    plt.close(fig)
    return out


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.3g}" if isinstance(x, float) else html.escape(str(x))


def summary_table(summary: Mapping[str, Any]) -> str:
    """An HTML table: one row per model, lane and prompt, with both verdicts."""
    head = ("model", "lane", "prompt", "status", "quantized", "q mean KL", "q top-1", "graph", "g mean KL", "g top-1")
    rows = []
    for model, m in sorted((summary.get("models") or {}).items()):
        for lane, e in sorted(m["lanes"].items()):
            for prompt, p in sorted(e["prompts"].items()):
                q, g = p.get("quantized") or {}, p.get("graph") or {}
                cells = (
                    model,
                    lane,
                    prompt,
                    p["status"],
                    q.get("status"),
                    q.get("mean_kl"),
                    q.get("same_top1_rate"),
                    g.get("status"),
                    g.get("mean_kl"),
                    g.get("same_top1_rate"),
                )
                tds = "".join(
                    f'<td class="{_fmt(c) if i in (3, 4, 7) else ""}">{_fmt(c)}</td>' for i, c in enumerate(cells)
                )
                rows.append(f"<tr>{tds}</tr>")
    style = (
        "table{border-collapse:collapse;font:13px sans-serif}td,th{border:1px solid #ccc;padding:3px 8px}"
        ".pass{background:#d4f7d4}.fail,.error,.token_mismatch{background:#f7d4d4}.skipped{background:#eee}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>"
        f"<p>run status: <b>{_fmt(summary.get('status'))}</b></p><table><tr>"
        + "".join(f"<th>{h}</th>" for h in head)
        + "</tr>"
        + "".join(rows)
        + "</table></body></html>\n"
    )
