"""Receipt verdicts, v1 compatibility, gates and deterministic content hashes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from parity_both.config import thresholds, with_defaults
from parity_both.receipt import TWIN_OFF_REASON, Evaluation, build_receipt, content_hash, load_receipt, validate_receipt
from parity_both.summary import build_summary, render_text

CONFIG = with_defaults({"models": {"m": {"gguf": "embedded"}}, "prompts": {"p": {"text": "hi"}}, "lanes": ["llama"]})

V1_RECEIPT = {
    "version": 1,
    "timestamp": "2025-10-26T14:30:00Z",
    "model": "models/model.gguf",
    "backend": "bitnet",
    "prompt": "What is 2+2?",
    "positions": 1,
    "thresholds": {"mse": 0.0001, "kl": 0.1, "topk": 0.8},
    "rows": [
        {
            "pos": 0,
            "mse": 1.23e-6,
            "max_abs": 0.0042,
            "kl": None,
            "topk_agree": None,
            "top5_rust": [128000, 1229, 374, 220, 17],
            "top5_cpp": [128000, 1229, 374, 220, 17],
        }
    ],
    "summary": {"all_passed": True, "first_divergence": None, "mean_mse": 2.15e-5, "mean_kl": None},
}


def _inputs(lane_logits=None, match=True, vocab_hash="v" * 64):
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(6, 300)).astype(np.float32) * 4
    ids = [5, 9, 11, 2, 0, 0]
    # the generated ids are the reference's greedy choices, as the reference engine makes them
    ids[4], ids[5] = int(ref[3].argmax()), int(ref[4].argmax())
    if lane_logits is None:
        lane_logits = ref + rng.normal(size=ref.shape).astype(np.float32) * 0.01
    auth = {
        "source": "gguf_embedded",
        "path": "m.gguf",
        "file_hash": "a" * 64,
        "config_hash": "b" * 64,
        "vocab_hash": "v" * 64,
        "vocab_size": 300,
        "bos_id": 1,
        "eos_id": 2,
    }
    parity = {"match": match, "ref_len": 4, "lane_len": 4}
    if not match:
        parity.update(first_divergent_pos=2, ref_id=11, lane_id=12, ref_piece="a", lane_piece="b")
    return dict(
        lane="llama",
        model_name="m",
        model={"path": "/m.gguf", "sha256": "c" * 64, "architecture": "llama"},
        authority=auth,
        lane_vocab={"vocab_hash": vocab_hash, "vocab_size": 300},
        prompt={
            "prompt": {"name": "p", "text": "hi", "system_prompt": None},
            "formatted": "hi",
            "template": {"requested": "raw", "used": "raw", "evidence": {"rule": "configured"}, "notes": []},
            "contract": {"add_bos": False, "add_eos": False, "parse_special": False},
        },
        backend={"identity": {"engine": "llama.cpp", "version": "0.3.36"}},
        mode="exact",
        quantized=Evaluation(
            reference={
                "ids": ids,
                "logits": ref,
                "n_prompt": 4,
                "settings": {"mode": "exact"},
                "timings": {"total_s": 1},
            },
            lane={
                "token_parity": parity,
                "logits": lane_logits if match else None,
                "settings": {"threads": 1},
                "timings": {"eval_s": 0.1},
                "timestamp": "2026-01-01T00:00:00Z",
            },
            files={"reference": "/m.gguf", "lane": "/m.gguf", "transcode": None},
        ),
        thresholds=thresholds(CONFIG, "exact"),
    )


def _lane(inp, **changes):
    """The inputs with the quantized lane result changed."""
    inp["quantized"] = replace(inp["quantized"], lane={**inp["quantized"].lane, **changes})
    return inp


def _graph(inp, lane_logits):
    """A graph evaluation on a twin: the quantized reference's logits, and these lane logits."""
    q = inp["quantized"]
    return Evaluation(q.reference, {**q.lane, "logits": lane_logits}, {"reference": "/twin.gguf", "lane": "/twin.gguf"})


def test_close_logits_pass_and_validate():
    r = build_receipt(**_inputs())
    validate_receipt(r)
    assert r["status"] == "pass" and r["exit_code"] == 0 and r["summary"]["all_passed"]
    q = r["quantized"]
    assert q["status"] == "pass" and q["positions"] == 6 and len(q["rows"]) == 6
    assert q["greedy"]["n_generated"] == 2 and q["greedy"]["exact_match_rate"] == 1.0
    assert r["summary"]["mean_mse"] == q["summary"]["mean_mse"] < 1e-3
    assert q["files"]["lane"] == "/m.gguf" and q["sequence"]["n_generated"] == 2
    assert r["graph"] == {"status": "skipped", "reason": TWIN_OFF_REASON}
    assert r["summary"]["verdicts"] == {"graph": "skipped", "quantized": "pass"}


def test_corrupted_logits_fail_with_exit_1():
    bad = np.random.default_rng(5).normal(size=(6, 300)).astype(np.float32)
    r = build_receipt(**_inputs(lane_logits=bad))
    validate_receipt(r)
    assert r["status"] == "fail" and r["exit_code"] == 1
    fd = r["summary"]["first_divergence"]
    assert fd["verdict"] == "quantized" and fd["pos"] == 0 and any("cosine" in x for x in fd["reasons"])
    assert all(f.startswith("quantized: ") for f in r["summary"]["failures"])


def test_nan_logits_fail():
    inp = _inputs()
    logits = inp["quantized"].lane["logits"].copy()
    logits[3, 7] = np.nan
    r = build_receipt(**_lane(inp, logits=logits))
    validate_receipt(r)
    assert r["status"] == "fail" and r["summary"]["first_divergence"]["pos"] == 3


def test_token_mismatch_has_no_rows_and_exit_2():
    r = build_receipt(**_inputs(match=False))
    validate_receipt(r)
    assert r["status"] == "token_mismatch" and r["exit_code"] == 2 and r["quantized"]["rows"] == []
    assert r["token_parity"]["first_divergent_pos"] == 2


def test_inconsistent_vocab_is_exit_2():
    r = build_receipt(**_inputs(vocab_hash="w" * 64))
    assert r["tokenizer_consistent"] is False and r["status"] == "tokenizer_inconsistent" and r["exit_code"] == 2


def test_gates_fail_the_lane_and_name_the_expression():
    inp = _inputs()
    r = build_receipt(**inp, gates=[".summary.mean_kl < 1", ".quantized.summary.same_top1.rate > 2"])
    assert r["status"] == "fail" and r["exit_code"] == 1
    assert [g["passed"] for g in r["gates"]] == [True, False]
    assert "gate failed: .quantized.summary.same_top1.rate > 2" in r["summary"]["failures"]
    r = build_receipt(**inp, gates=["this is not jq"])
    assert r["status"] == "fail" and "error" in r["gates"][0]


def test_content_hash_ignores_timestamp_and_timings():
    a = build_receipt(**_inputs())
    b = build_receipt(**_lane(_inputs(), timestamp="2030-01-01T00:00:00Z", timings={"eval_s": 99}))
    assert a["content_sha256"] == b["content_sha256"] == content_hash(b)
    assert a["timestamp"] != b["timestamp"] and a["timings"] != b["timings"]
    c = build_receipt(**_inputs(vocab_hash="w" * 64))
    assert c["content_sha256"] != a["content_sha256"]


def test_both_verdicts_must_pass():
    """Graph and quantized are judged separately, each with its own thresholds; a lane passes only if
    both pass, and either failing fails it with exit 1."""
    graph_th = thresholds(CONFIG, "graph")
    inp = _inputs()
    ref = inp["quantized"].reference["logits"]
    close = (ref + np.random.default_rng(3).normal(size=ref.shape).astype(np.float32) * 1e-4).astype(np.float32)
    ok = build_receipt(**inp, graph=_graph(inp, close), graph_thresholds=graph_th)
    validate_receipt(ok)
    assert ok["status"] == "pass" and ok["summary"]["verdicts"] == {"graph": "pass", "quantized": "pass"}
    assert ok["graph"]["thresholds"]["cos_tol"] == 0.999 and ok["graph"]["files"]["lane"] == "/twin.gguf"
    # the quantized lane's noise (0.01) passes the quantized thresholds but not the graph's
    noisy = inp["quantized"].lane["logits"]
    bad = build_receipt(**inp, graph=_graph(inp, noisy), graph_thresholds=graph_th)
    validate_receipt(bad)
    assert bad["quantized"]["status"] == "pass" and bad["graph"]["status"] == "fail"
    assert bad["status"] == "fail" and bad["exit_code"] == 1 and not bad["summary"]["all_passed"]
    assert bad["summary"]["failures"] == [f"graph: {f}" for f in bad["graph"]["summary"]["failures"]]
    assert any(f.startswith("graph: mean KL") for f in bad["summary"]["failures"])
    assert bad["graph"]["summary"]["mean_kl"] == bad["quantized"]["summary"]["mean_kl"]  # same logits, same numbers
    s = build_summary([ok, bad | {"backend": "other"}])
    assert s["models"]["m"]["lanes"]["llama"]["graph"]["status"] == "pass"
    assert s["models"]["m"]["lanes"]["other"]["graph"]["status"] == "fail"
    assert s["models"]["m"]["lanes"]["other"]["quantized"]["status"] == "pass"
    assert s["overall"]["exit_code"] == 1 and s["lanes"]["other"]["status"] == "failed"
    text = render_text(s)
    assert "Graph (twin):     ✓ pass" in text and "Graph (twin):     ✗ fail" in text and "Quantized:" in text


def test_v1_receipt_loads_upgraded(tmp_path):
    p = tmp_path / "receipt_bitnet.json"
    p.write_text(json.dumps(V1_RECEIPT))
    r = load_receipt(p)
    validate_receipt(r)
    assert r["version"] == 3 and r["upgraded_from_version"] == 1
    assert r["quantized"]["rows"][0]["top5_ref"] == [128000, 1229, 374, 220, 17]
    assert r["quantized"]["thresholds"] == {"mse": 0.0001, "kl": 0.1, "topk": 0.8}
    assert r["summary"]["mean_mse"] == 2.15e-5 and r["status"] == "pass" and r["quantized"]["status"] == "pass"
    assert r["graph"]["status"] == "skipped" and "v1" in r["graph"]["reason"]
    assert r["tokenizer_authority"] is None
    text = render_text(build_summary([r]))
    assert "Lane A: bitnet" in text and "Exit code:        0" in text


def test_v2_receipt_loads_upgraded():
    """A receipt written by the v2 code (tests/data/receipt_v2.json) loads in v3 shape."""
    path = Path(__file__).parent / "data" / "receipt_v2.json"
    v2 = json.loads(path.read_text())
    r = load_receipt(path)
    validate_receipt(r)
    assert r["version"] == 3 and r["upgraded_from_version"] == 2 and r["status"] == v2["status"] == "pass"
    assert r["quantized"]["rows"] == v2["rows"] and r["quantized"]["thresholds"] == v2["thresholds"]
    assert r["quantized"]["files"] == v2["evaluated_files"] and r["quantized"]["sequence"] == v2["sequence"]
    assert r["graph"] == {"status": "skipped", "reason": "receipt v2 predates the graph verdict"}
    assert not {"rows", "thresholds", "positions", "greedy", "sequence", "evaluated_files"} & set(r)
    # the top-level summary has v3's shape: the per-verdict numbers live in quantized.summary only
    assert set(r["summary"]) <= {"all_passed", "failures", "first_divergence", "mean_mse", "mean_kl", "verdicts"}
    assert r["quantized"]["summary"]["nmse"] == v2["summary"]["nmse"]


def test_unknown_version_is_refused(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"version": 9}))
    with pytest.raises(ValueError, match="version 9"):
        load_receipt(p)


def test_summary_layouts():
    good = build_receipt(**_inputs())
    bad = build_receipt(**_inputs(match=False))
    bad["backend"] = "bitnet"
    s = build_summary([good, bad])
    assert s["overall"]["exit_code"] == 2 and s["overall"]["both_passed"] is False
    assert s["lanes"]["llama"]["status"] == "ok" and s["lanes"]["bitnet"]["status"] == "failed"
    assert s["tokenizer_authority"]["source"] == "gguf_embedded"
    text = render_text(s)
    assert "Tokenizer Authority" in text and "Exit code:        2" in text and "Lane A: bitnet" in text
    assert "Graph (twin):     - skipped" in text


def test_failed_run_summary_lists_lanes_that_could_not_run():
    """A run whose job failed: its failure records decide the exit code (the most specific one) and
    name the lanes that could not run, beside the receipts that exist."""
    good = build_receipt(**_inputs())
    records = [
        {
            "exit_code": 5,
            "kind": "build",
            "rule": "backend",
            "message": "cmake failed",
            "wildcards": {"lane": "bitnet"},
            "log": "results/logs/backends/bitnet.log",
        },
        {
            "exit_code": 1,
            "kind": "internal",
            "rule": "reference",
            "message": "boom",
            "wildcards": {"model": "m", "prompt": "q"},
            "log": "results/logs/m/reference/q.log",
        },
    ]
    s = build_summary([good], errors=records, lanes=["bitnet", "llama"])
    assert s["overall"]["exit_code"] == 5 and s["status"] == "failed" and not s["overall"]["both_passed"]
    assert s["lanes"]["bitnet"] == {
        "status": "error",
        "exit_code": 5,
        "kind": "build",
        "message": "cmake failed",
        "models": {},
    }
    assert s["lanes"]["llama"]["status"] == "ok" and s["errors"] == records
    assert "bitnet: build (exit 5): cmake failed" in render_text(s)
    empty = build_summary([], errors=[], lanes=["llama"])
    assert empty["overall"]["exit_code"] == 2 and "No lane produced a receipt" in render_text(empty)


def test_write_failed_summary_keeps_only_this_runs_receipts(tmp_path):
    """The workflow's onerror handler: receipts downstream of a job that failed in this run are an
    earlier run's and are left out; failure records older than the run are ignored; summary.json goes."""
    import os
    import time

    from parity_both.pipeline import write_failed_summary

    out = tmp_path / "results"
    paths = {}
    for lane in ("llama", "bitnet"):
        r = build_receipt(**_inputs())
        r["backend"] = lane
        paths[lane] = out / f"m/receipts/{lane}/p.json"
        paths[lane].parent.mkdir(parents=True)
        paths[lane].write_text(json.dumps(r))
    (out / "summary.json").write_text("{}")
    logs = out / "logs/backends"
    logs.mkdir(parents=True)
    stale = logs / "llama.log.failure.json"
    stale.write_text(json.dumps({"exit_code": 3, "rule": "backend", "wildcards": {"lane": "llama"}}))
    os.utime(stale, (0, 0))  # written by an earlier run
    since = time.time() - 1
    (logs / "bitnet.log.failure.json").write_text(
        json.dumps(
            {
                "exit_code": 5,
                "kind": "build",
                "rule": "backend",
                "message": "cmake failed",
                "wildcards": {"lane": "bitnet"},
                "log": "results/logs/backends/bitnet.log",
            }
        )
    )
    path = write_failed_summary(str(out), [str(p) for p in paths.values()], ["bitnet", "llama"], since)
    s = json.loads(path.read_text())
    assert path == out / "summary.failed.json" and (out / "summary.failed.txt").read_text() == render_text(s)
    assert not (out / "summary.json").exists()
    assert list(s["models"]["m"]["lanes"]) == ["llama"] and s["overall"]["receipts"] == 1
    assert s["lanes"]["bitnet"]["status"] == "error" and s["lanes"]["llama"]["status"] == "ok"
    assert [e["exit_code"] for e in s["errors"]] == [5] and s["overall"]["exit_code"] == 5
