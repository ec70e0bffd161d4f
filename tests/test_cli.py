"""The `parity-both` command: flags, stdout purity, exit codes, no half-written results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import drop_merge_for

CLI = [sys.executable, "-m", "parity_both.cli"]


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_json_stdout_is_pure_and_receipt_written(tmp_path):
    out = tmp_path / "ci"
    p = run_cli(
        "--out-dir",
        str(out),
        "--lanes",
        "llama",
        "--format",
        "json",
        "--max-tokens",
        "2",
        "--prompt",
        "What is 2+2?",
        "--prompt-template",
        "chatml",
        "--system-prompt",
        "Be brief.",
        "--dump-ids",
        "--dump-cpp-ids",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout)  # the whole of stdout is one JSON document
    assert summary["overall"]["exit_code"] == 0 and summary["overall"]["both_passed"] is True
    assert summary["lanes"]["llama"]["status"] == "ok"
    assert summary == json.loads((out / "results/summary.json").read_text())  # the workflow's own summary
    lane = summary["models"]["model"]["lanes"]["llama"]
    assert lane["quantized"]["status"] == "pass" and lane["graph"]["status"] == "pass"
    receipt = json.loads((out / "receipt_llama.json").read_text())
    assert receipt["prompt_template"]["used"] == "chatml"
    assert receipt["prompt_template"]["system_prompt"] == "Be brief."
    assert receipt["quantized"]["sequence"]["n_generated"] <= 2
    # --dump-ids / --dump-cpp-ids go to stderr
    assert "reference token ids" in p.stderr and "llama token ids vs reference (match)" in p.stderr


def test_token_mismatch_exits_2_without_logits(tmp_path, smol_path):
    from parity_both.tokenize.authority import build_authority

    tok = tmp_path / "tokenizer.json"
    build_authority(smol_path, "gguf_embedded", None, str(tok))
    prompt = "Photosynthesis converts sunlight into chemical energy."
    drop_merge_for(tok, prompt)
    out = tmp_path / "ci"
    p = run_cli(
        "--out-dir",
        str(out),
        "--lanes",
        "llama",
        "--tokenizer",
        str(tok),
        "--prompt",
        prompt,
        "--prompt-template",
        "raw",
        "--max-tokens",
        "1",
        "--cos-tol",
        "0.99",
        "--metrics",
        "cos,kl",
    )
    assert p.returncode == 2, p.stdout + p.stderr[-3000:]
    assert "TOKEN_MISMATCH" in p.stdout
    assert p.stdout == (out / "results/summary.txt").read_text()  # the workflow's own text summary
    receipt = json.loads((out / "receipt_llama.json").read_text())
    assert receipt["status"] == "token_mismatch" and receipt["quantized"]["rows"] == []
    tp = receipt["token_parity"]
    assert tp["match"] is False and tp["ref_id"] != tp["lane_id"] and "first_divergent_pos" in tp
    th = receipt["quantized"]["thresholds"]
    assert th["cos_tol"] == 0.99 and th["topk_min"] is None and th["same_top1_min"] is None and th["kl_max"] == 0.1
    with np.load(out / "results/model/lanes/llama/prompt.npz") as z:
        assert not bool(z["has_logits"]) and z["logits"].size == 0  # no logits computed on a mismatch
    assert receipt["tokenizer_authority"]["source"] == "external"


def test_broken_gguf_is_one_clear_line_and_nothing_written(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    out = tmp_path / "ci"
    p = run_cli("--model-gguf", str(bad), "--out-dir", str(out))
    assert p.returncode == 2
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "broken.gguf" in lines[0] and lines[0].startswith("parity-both: error:")
    assert not out.exists()


def test_not_a_gguf_and_missing_tokenizer(tmp_path):
    txt = tmp_path / "model.gguf"
    txt.write_text("hello")
    p = run_cli("--model-gguf", str(txt), "--out-dir", str(tmp_path / "o"))
    assert p.returncode == 2 and "not a GGUF file" in p.stderr
    p = run_cli("--tokenizer", str(tmp_path / "nope.json"), "--out-dir", str(tmp_path / "o"))
    assert p.returncode == 2 and "no such file" in p.stderr
    p = run_cli("--metrics", "mse,bogus")
    assert p.returncode == 2 and "bogus" in p.stderr


def test_help_lists_every_seed_flag():
    p = run_cli("--help")
    for flag in (
        "--model-gguf",
        "--tokenizer",
        "--prompt",
        "--max-tokens",
        "--cos-tol",
        "--out-dir",
        "--format",
        "--prompt-template",
        "--system-prompt",
        "--no-repair",
        "--verbose",
        "--dump-ids",
        "--dump-cpp-ids",
        "--metrics",
        "--lanes",
    ):
        assert flag in p.stdout


def test_workflow_files_are_where_the_cli_expects():
    root = Path(__file__).resolve().parent.parent
    assert (root / "Snakefile").is_file() and (root / "profiles/default/config.yaml").is_file()


def test_broken_tokenizer_json_exits_2_with_a_clear_paragraph(tmp_path):
    tok = tmp_path / "tokenizer.json"
    tok.write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}}))
    out = tmp_path / "ci"
    p = run_cli(
        "--out-dir", str(out), "--lanes", "llama", "--tokenizer", str(tok), "--max-tokens", "1", "--format", "json"
    )
    assert p.returncode == 2, p.stderr[-2000:]
    summary = json.loads(p.stdout)  # stdout stays one JSON document
    assert summary["overall"]["exit_code"] == 2
    # what the CLI prints is the failed run's summary the workflow itself wrote, with the failure records
    assert summary == json.loads((out / "results/summary.failed.json").read_text())
    assert [e["rule"] for e in summary["errors"]] == ["tokenizer_authority"]
    assert not (out / "results/summary.json").exists()
    assert "tokenizer" in p.stderr and "cannot be used" in p.stderr
    assert f"log: {out}/results/logs/model/tokenizer_authority.log" in p.stderr
    # no half-written results: the failed job's outputs are gone, no receipt exists
    assert not (out / "results/model/tokenizer/authority.json").exists()
    assert not list(out.glob("receipt_*.json"))
