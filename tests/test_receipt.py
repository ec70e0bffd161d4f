"""Receipt verdicts, v1 compatibility, gates and deterministic content hashes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from parity_both.config import DEFAULT_THRESHOLDS
from parity_both.receipt import build_receipt, content_hash, load_receipt, validate_receipt
from parity_both.summary import build_summary, render_text

V1_RECEIPT = {
    "version": 1, "timestamp": "2025-10-26T14:30:00Z", "model": "models/model.gguf", "backend": "bitnet",
    "prompt": "What is 2+2?", "positions": 1, "thresholds": {"mse": 0.0001, "kl": 0.1, "topk": 0.8},
    "rows": [{"pos": 0, "mse": 1.23e-6, "max_abs": 0.0042, "kl": None, "topk_agree": None,
              "top5_rust": [128000, 1229, 374, 220, 17], "top5_cpp": [128000, 1229, 374, 220, 17]}],
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
    auth = {"source": "gguf_embedded", "path": "m.gguf", "file_hash": "a" * 64, "config_hash": "b" * 64,
            "vocab_hash": "v" * 64, "vocab_size": 300, "bos_id": 1, "eos_id": 2}
    parity = {"match": match, "ref_len": 4, "lane_len": 4}
    if not match:
        parity.update(first_divergent_pos=2, ref_id=11, lane_id=12, ref_piece="a", lane_piece="b")
    return dict(
        lane="llama",
        model={"path": "/m.gguf", "sha256": "c" * 64, "architecture": "llama"},
        authority=auth,
        lane_vocab={"vocab_hash": vocab_hash, "vocab_size": 300},
        prompt={"prompt": {"name": "p", "text": "hi", "system_prompt": None}, "formatted": "hi",
                "template": {"requested": "raw", "used": "raw", "evidence": {"rule": "configured"}, "notes": []},
                "contract": {"add_bos": False, "add_eos": False, "parse_special": False}},
        reference={"ids": ids, "logits": ref, "n_prompt": 4, "settings": {"mode": "exact"}, "timings": {"total_s": 1}},
        lane_result={"token_parity": parity, "logits": lane_logits if match else None, "settings": {"threads": 1},
                     "timings": {"eval_s": 0.1}, "timestamp": "2026-01-01T00:00:00Z"},
        backend={"identity": {"engine": "llama.cpp", "version": "0.3.36"}},
        thresholds=DEFAULT_THRESHOLDS["exact"], mode="exact",
    )


def test_close_logits_pass_and_validate():
    r = build_receipt(**_inputs())
    validate_receipt(r)
    assert r["status"] == "pass" and r["exit_code"] == 0 and r["summary"]["all_passed"]
    assert r["positions"] == 6 and len(r["rows"]) == 6
    assert r["greedy"]["n_generated"] == 2 and r["greedy"]["exact_match_rate"] == 1.0
    assert r["summary"]["mean_mse"] < 1e-3


def test_corrupted_logits_fail_with_exit_1():
    bad = np.random.default_rng(5).normal(size=(6, 300)).astype(np.float32)
    r = build_receipt(**_inputs(lane_logits=bad))
    validate_receipt(r)
    assert r["status"] == "fail" and r["exit_code"] == 1
    fd = r["summary"]["first_divergence"]
    assert fd["pos"] == 0 and any("cosine" in x for x in fd["reasons"])


def test_nan_logits_fail():
    inp = _inputs()
    inp["lane_result"]["logits"] = inp["lane_result"]["logits"].copy()
    inp["lane_result"]["logits"][3, 7] = np.nan
    r = build_receipt(**inp)
    assert r["status"] == "fail" and r["summary"]["first_divergence"]["pos"] == 3


def test_token_mismatch_has_no_rows_and_exit_2():
    r = build_receipt(**_inputs(match=False))
    validate_receipt(r)
    assert r["status"] == "token_mismatch" and r["exit_code"] == 2 and r["rows"] == []
    assert r["token_parity"]["first_divergent_pos"] == 2


def test_inconsistent_vocab_is_exit_2():
    r = build_receipt(**_inputs(vocab_hash="w" * 64))
    assert r["tokenizer_consistent"] is False and r["status"] == "tokenizer_inconsistent" and r["exit_code"] == 2


def test_gates_fail_the_lane_and_name_the_expression():
    inp = _inputs()
    r = build_receipt(**inp, gates=[".summary.mean_kl < 1", ".summary.same_top1.rate > 2"])
    assert r["status"] == "fail" and r["exit_code"] == 1
    assert [g["passed"] for g in r["gates"]] == [True, False]
    assert any(".summary.same_top1.rate > 2" in f for f in r["summary"]["failures"])
    r = build_receipt(**inp, gates=["this is not jq"])
    assert r["status"] == "fail" and "error" in r["gates"][0]


def test_content_hash_ignores_timestamp_and_timings():
    a = build_receipt(**_inputs())
    inp = _inputs()
    inp["lane_result"]["timestamp"] = "2030-01-01T00:00:00Z"
    inp["lane_result"]["timings"] = {"eval_s": 99}
    b = build_receipt(**inp)
    assert a["content_sha256"] == b["content_sha256"] == content_hash(b)
    assert a["timestamp"] != b["timestamp"]


def test_v1_receipt_loads(tmp_path):
    p = tmp_path / "receipt_bitnet.json"
    p.write_text(json.dumps(V1_RECEIPT))
    r = load_receipt(p)
    assert r["version"] == 2 and r["upgraded_from_version"] == 1
    assert r["rows"][0]["top5_ref"] == [128000, 1229, 374, 220, 17]
    assert r["summary"]["mean_mse"] == 2.15e-5 and r["status"] == "pass"
    assert r["tokenizer_authority"] is None


def test_unknown_version_is_refused(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"version": 9}))
    with pytest.raises(ValueError, match="version 9"):
        load_receipt(p)


def test_summary_layouts():
    good = build_receipt(**_inputs())
    bad = build_receipt(**_inputs(match=False))
    for r, lane in ((good, "llama"), (bad, "bitnet")):
        r["backend"] = lane
        r["model_name"] = "m"
        r["prompt_name"] = "p"
    s = build_summary([good, bad])
    assert s["overall"]["exit_code"] == 2 and s["overall"]["both_passed"] is False
    assert s["lanes"]["llama"]["status"] == "ok" and s["lanes"]["bitnet"]["status"] == "failed"
    assert s["tokenizer_authority"]["source"] == "gguf_embedded"
    text = render_text(s)
    assert "Tokenizer Authority" in text and "Exit code:        2" in text and "Lane A: bitnet" in text
