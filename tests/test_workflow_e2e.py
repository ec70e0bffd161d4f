"""The real workflow on the real embedded model with the real llama-cpp-python (no mocks)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from parity_both.receipt import load_receipt, validate_receipt

from conftest import jobs_run, snakemake, write_config

PROMPTS = {
    "capital": {"text": "What is the capital of France?", "template": "raw"},
    "code": {"text": "def fibonacci(n):", "template": "raw"},
    "chat": {"text": "Name three primary colours.", "template": "auto"},
}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """One complete run; tests copy it and change one thing."""
    work = tmp_path_factory.mktemp("base")
    write_config(work, {"models": {"smol": {"gguf": "embedded"}}, "prompts": PROMPTS, "max_tokens": 3})
    proc = snakemake(work)
    return work, proc


def clone(base: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "work"
    shutil.copytree(base, dst, symlinks=True)
    return dst


def test_end_to_end_passes_with_complete_receipts(base_run):
    work, proc = base_run
    summary = json.loads((work / "results/summary.json").read_text())
    assert summary["overall"]["exit_code"] == 0, (work / "results/summary.txt").read_text()
    assert summary["overall"]["both_passed"] and summary["overall"]["tokenizer_consistent"]
    assert summary["lanes"]["llama"]["status"] == "ok"
    for prompt in PROMPTS:
        r = load_receipt(work / f"results/smol/receipts/llama/{prompt}.json")
        validate_receipt(r)
        a = r["tokenizer_authority"]
        assert a["source"] == "gguf_embedded" and len(a["file_hash"]) == 64 and len(a["config_hash"]) == 64
        assert a["vocab_hash"] == r["lane_tokenizer_authority"]["vocab_hash"]
        q = r["quantized"]
        assert r["token_parity"]["match"] and q["sequence"]["n_generated"] <= 3
        assert q["positions"] == len(q["sequence"]["ids"]) > 3 and q["status"] == "pass"
        g = r["graph"]  # both sides on the lossless F32 twin: the honest floor is ~1e-9 KL, not ~1e-3
        assert g["status"] == "pass" and g["files"]["twin"]["dtype"] == "F32" and g["files"]["twin"]["exact"]
        assert g["files"]["reference"] == g["files"]["lane"] != r["model"]
        assert g["summary"]["mean_kl"] < 1e-6 < q["summary"]["mean_kl"]
        assert r["localization"]["status"] == "not_run"  # the graph verdict passed and diagnose is off
        k = r["kernels"]  # every node the lane evaluated on the Q4_1 file, recomputed from its own inputs
        assert k["status"] == "pass" and k["counts"]["failed"] == 0 and k["counts"]["checked"] > 500, k["diagnosis"]
        assert r["model_sha256"] == json.loads((work / "results/smol/model.json").read_text())["sha256"]
        assert r["backend_identity"]["runtime"]["engine"] == "llama.cpp"
        assert r["backend_identity"]["runtime"]["version"] == "0.3.36"
        assert r["determinism"]["lane"]["type_k"] == "f32" and r["determinism"]["lane"]["flash_attn"] is False
    chat = load_receipt(work / "results/smol/receipts/llama/chat.json")
    assert chat["prompt_template"]["used"] == "chatml" and chat["prompt_template"]["evidence"]["rule"]
    assert chat["tokenization_contract"]["parse_special"] is True
    assert chat["quantized"]["sequence"]["ids"][0] == 1  # <|im_start|> as ONE special id, no BOS (add_bos false)
    # benchmark: directive records each heavy job
    assert (work / "results/benchmarks/smol/reference/capital.tsv").is_file()


def test_up_to_date_run_has_nothing_to_do(base_run):
    work, _ = base_run
    proc = snakemake(work, "-n")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_corrupted_lane_logits_fail_the_receipt(base_run, tmp_path):
    work = clone(base_run[0], tmp_path)
    npz = work / "results/smol/lanes/llama/code.npz"
    with np.load(npz) as z:
        data = {k: z[k] for k in z.files}
    rng = np.random.default_rng(0)
    data["logits"] = (data["logits"] + rng.normal(size=data["logits"].shape) * 3).astype(np.float32)
    np.savez(npz, **data)
    proc = snakemake(work)
    ran = jobs_run(proc)
    assert "receipt" in ran and "lane_eval" not in ran and "reference" not in ran
    r = load_receipt(work / "results/smol/receipts/llama/code.json")
    assert r["status"] == "fail" and r["exit_code"] == 1
    assert r["summary"]["first_divergence"] is not None
    summary = json.loads((work / "results/summary.json").read_text())
    assert summary["overall"]["exit_code"] == 1 and not summary["overall"]["both_passed"]


def test_off_by_one_position_bug_fails_the_default_thresholds(base_run, tmp_path):
    """The defaults must fail a real bug: lane logits shifted by one position (a classic off-by-one)."""
    work = clone(base_run[0], tmp_path)
    npz = work / "results/smol/lanes/llama/capital.npz"
    with np.load(npz) as z:
        data = {k: z[k] for k in z.files}
    data["logits"] = np.concatenate([data["logits"][1:], data["logits"][-1:]]).astype(np.float32)
    np.savez(npz, **data)
    snakemake(work)
    r = load_receipt(work / "results/smol/receipts/llama/capital.json")
    assert r["status"] == "fail" and r["summary"]["mean_kl"] > 0.5


def test_external_tokenizer_differing_from_the_lane_is_inconsistent_exit_2(tmp_path, smol_path):
    """AC5: a tokenizer.json whose vocabulary differs from the engine's (one unused piece renamed) is
    caught by comparing the reference authority with the lane's own vocabulary: exit code 2, and the
    first differing id is named."""
    from parity_both.tokenize.authority import build_authority

    work = tmp_path / "w"
    work.mkdir()
    tok = work / "tokenizer.json"
    build_authority(smol_path, "gguf_embedded", None, str(tok))
    data = json.loads(tok.read_text())
    vocab = data["model"]["vocab"]
    old = next(k for k, v in vocab.items() if v == 5)  # <file_sep>, a control token no prompt uses
    vocab["<file_separator>"] = vocab.pop(old)
    for t in data["added_tokens"]:
        if t["id"] == 5:
            t["content"] = "<file_separator>"
    tok.write_text(json.dumps(data))
    write_config(
        work,
        {
            "models": {"smol": {"gguf": "embedded", "tokenizer": str(tok)}},
            "prompts": {"capital": PROMPTS["capital"]},
            "max_tokens": 1,
        },
    )
    snakemake(work)
    r = load_receipt(work / "results/smol/receipts/llama/capital.json")
    assert r["token_parity"]["match"] is True  # the prompt does not use the renamed piece
    assert r["tokenizer_consistent"] is False and r["status"] == "tokenizer_inconsistent" and r["exit_code"] == 2
    diff = r["lane_tokenizer_authority"]["difference"]
    assert diff["first_difference"]["id"] == 5
    assert r["tokenizer_authority"]["source"] == "external"
    agreement = r["tokenizer_authority"]["gguf_agreement"]
    assert agreement and agreement.get("agrees") is False
    summary = json.loads((work / "results/summary.json").read_text())
    assert summary["overall"]["tokenizer_consistent"] is False and summary["overall"]["exit_code"] == 2


def test_bitnet_activation_setting_changes_the_verdict_and_the_receipt_says_why(tmp_path):
    """One bitnet fixture, two references: silu (what llama.cpp computes) passes, relu2 (what the
    published 2B-4T model was trained with) fails - and the receipt names the activation as the cause."""
    work = tmp_path / "w"
    work.mkdir()
    fixture = {"arch": "bitnet", "weight_type": "TQ2_0", "size": "tiny", "seed": 1}
    write_config(
        work,
        {
            "models": {
                "silu": {"fixture": fixture, "activation": "silu"},
                "relu2": {"fixture": fixture, "activation": "relu2"},
            },
            "prompts": {"capital": PROMPTS["capital"]},
            "max_tokens": 2,
        },
    )
    snakemake(work)
    ok = load_receipt(work / "results/silu/receipts/llama/capital.json")
    bad = load_receipt(work / "results/relu2/receipts/llama/capital.json")
    assert ok["status"] == "pass" and ok["reference_settings"]["activation"] == "silu"
    assert bad["status"] == "fail" and bad["reference_settings"]["activation"] == "relu2"
    assert bad["summary"]["mean_kl"] > 100 * ok["summary"]["mean_kl"]
    assert any("relu2" in h and "SiLU" in h for h in bad["summary"]["hints"])
    # the two models are byte-identical files: only the reference's activation differs
    assert ok["model_sha256"] == bad["model_sha256"]


def test_transcoded_i2s_fixture_runs_in_the_llama_lane(tmp_path):
    """BitNet.cpp's format (I2_S, bitnet-b1.58 keys) is transcoded for the mainline lane; the receipt
    says which file each side evaluated and the transcode's exact effect."""
    work = tmp_path / "w"
    work.mkdir()
    write_config(
        work,
        {
            "models": {
                "i2s": {
                    "fixture": {"arch": "bitnet-b1.58", "weight_type": "I2_S", "size": "tiny", "seed": 0},
                    "activation": "silu",
                }
            },
            "prompts": {"capital": PROMPTS["capital"]},
            "max_tokens": 2,
        },
    )
    snakemake(work)
    r = load_receipt(work / "results/i2s/receipts/llama/capital.json")
    assert r["status"] == "pass", r["summary"]
    files = r["quantized"]["files"]
    assert files["reference"].endswith("fixtures/i2s.gguf") and files["lane"].endswith("transcoded/mainline.gguf")
    effect = files["transcode"]
    assert effect["tensors_transcoded"] and effect["max_rel_scale_change"] is not None
    assert r["model_facts"]["type_numbering"] == "bitnet.cpp"
    # every job leaves its benchmark record (wall, peak RSS): bench/bench_2b_run.py's per-job table
    bench = work / "results/benchmarks"
    for job in ("i2s/transcode", "i2s/model_facts", "i2s/lanes/llama/vocab", "i2s/receipts/llama/capital", "summary"):
        assert (bench / f"{job}.tsv").is_file(), job


# -- the graph verdict judged on chosen npz (the workflow's own quantized reference and lane npz, or a
# synthetic faithful lane, stand in for the twin pair) -----------------------------------------------
def _receipt_with_twin(work: Path, prompt: str, twin_reference: Path, twin_lane: Path) -> dict:
    from parity_both import pipeline
    from parity_both.config import thresholds, with_defaults

    cfg = with_defaults(yaml.safe_load((work / "config.yaml").read_text()))
    res = work / "results"
    receipt = pipeline.make_receipt(
        lane="llama",
        model_name="smol",
        model_json=str(res / "smol/model.json"),
        authority_json=str(res / "smol/tokenizer/authority.json"),
        tokenizer_json=str(res / "smol/tokenizer/tokenizer.json"),
        prompt_json=str(res / f"smol/prompts/{prompt}.json"),
        reference_npz=str(res / f"smol/reference/{prompt}.npz"),
        lane_npz=str(res / f"smol/lanes/llama/{prompt}.npz"),
        lane_vocab_json=str(res / "smol/lanes/llama/vocab.json"),
        backend_json=str(res / "backends/llama.json"),
        thresholds={"quantized": thresholds(cfg, "exact"), "graph": thresholds(cfg, "graph")},
        mode="exact",
        gates=[],
        twin_reference_npz=str(twin_reference),
        twin_lane_npz=str(twin_lane),
        twin_record_json=str(res / "smol/twin/auto.json"),
    )
    return receipt


def test_graph_verdict_on_real_npz_fails_the_quantized_noise(base_run, tmp_path):
    """The real Q4_1 pair as the twin pair: its quantization noise (mean KL ~1e-3) passes the quantized
    thresholds but fails the graph thresholds (~1e-5), so the receipt fails with exit 1."""
    work, _ = base_run
    res = work / "results/smol"
    r = _receipt_with_twin(work, "capital", res / "reference/capital.npz", res / "lanes/llama/capital.npz")
    validate_receipt(r)
    assert r["quantized"]["status"] == "pass" and r["graph"]["status"] == "fail"
    assert r["status"] == "fail" and r["exit_code"] == 1
    assert r["graph"]["summary"]["mean_kl"] == r["quantized"]["summary"]["mean_kl"] > 1e-4  # the same pair
    assert r["graph"]["thresholds"]["mean_kl_max"] < r["quantized"]["thresholds"]["mean_kl_max"]
    assert any(f.startswith("graph: ") for f in r["summary"]["failures"])


def test_graph_verdict_on_real_npz_passes_a_faithful_twin_lane(base_run, tmp_path):
    """A twin lane whose logits are the twin reference's up to float32 rounding noise (what an honest
    engine gives on the twin) passes the graph verdict; both verdicts pass."""
    work, _ = base_run
    res = work / "results/smol"
    with np.load(res / "reference/code.npz") as z:
        ref_logits = z["logits"]
    with np.load(res / "lanes/llama/code.npz") as z:
        data = {k: z[k] for k in z.files}
    noise = np.random.default_rng(1).normal(size=ref_logits.shape) * 1e-4 * np.abs(ref_logits).mean()
    data["logits"] = (ref_logits + noise).astype(np.float32)
    twin_lane = tmp_path / "twin_lane.npz"
    np.savez(twin_lane, **data)
    r = _receipt_with_twin(work, "code", res / "reference/code.npz", twin_lane)
    validate_receipt(r)
    assert r["graph"]["status"] == "pass" and r["quantized"]["status"] == "pass", r["summary"]
    assert r["status"] == "pass" and r["exit_code"] == 0
    assert r["graph"]["summary"]["mean_kl"] < 1e-6 < r["quantized"]["summary"]["mean_kl"]
