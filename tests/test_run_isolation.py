"""Runs that cannot mix, and one JSON document on stdout for every exit of `parity-both --format json`."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "parity_both.cli"]
FAST = ("--lanes", "llama", "--max-tokens", "1", "--format", "json")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    """The tiny generated model (a run takes seconds): the flags that select it."""
    from parity_both.fixtures import write_fixture

    path = tmp_path_factory.mktemp("model") / "tiny.gguf"
    write_fixture(path, arch="llama", weight_type="F32", size="tiny")
    return ["--model-gguf", str(path), "--prompt-template", "raw"]


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def one_document(p: subprocess.CompletedProcess) -> dict:
    """stdout is exactly one JSON document; stderr has no traceback."""
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    doc = json.loads(p.stdout)
    assert doc["overall"]["exit_code"] == p.returncode
    return doc


def assert_error(doc: dict, kind: str, fragment: str) -> None:
    e = doc["error"]
    assert e["kind"] == kind and fragment in e["message"], e
    assert e["fix"] and "log" in e and doc["overall"]["receipts"] == 0 and doc["run"]["id"]


def write(path: Path, data: bytes | str) -> str:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


PREFLIGHT = [  # (name, args builder(tmp), kind, message fragment)
    (
        "broken_gguf",
        lambda t: ["--model-gguf", write(t / "b.gguf", b"GGUF\x03\0\0\0" + b"\xff" * 40)],
        "bad_input",
        "b.gguf",
    ),
    ("missing_gguf", lambda t: ["--model-gguf", str(t / "none.gguf")], "bad_input", "no such file"),
    ("tokenizer_not_json", lambda t: ["--tokenizer", write(t / "t.json", "{nope")], "bad_input", "not a JSON"),
    ("config_not_yaml", lambda t: ["--config", write(t / "c.yaml", "a: [")], "bad_input", "not valid YAML"),
    ("config_not_mapping", lambda t: ["--config", write(t / "c.yaml", "- 1\n")], "bad_input", "must be a YAML mapping"),
    ("config_schema", lambda t: ["--config", write(t / "c.yaml", "threads: -3\n")], "bad_input", "threads"),
]


@pytest.mark.parametrize("name,make,kind,fragment", PREFLIGHT, ids=[c[0] for c in PREFLIGHT])
def test_preflight_failure_prints_one_json_document(tmp_path, name, make, kind, fragment):
    out = tmp_path / "ci"
    p = run_cli("--out-dir", str(out), *make(tmp_path), *FAST)
    assert p.returncode == 2, p.stderr
    assert_error(one_document(p), kind, fragment)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("parity-both: error:"), p.stderr
    assert not out.exists()  # an unusable input writes nothing


def test_bad_arguments_print_one_json_document():
    p = run_cli("--metrics", "bogus", "--format", "json")
    assert p.returncode == 2
    assert_error(one_document(p), "bad_arguments", "invalid arguments")
    assert "bogus" in p.stderr


def receipt_copies(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("receipt_*.json")}


def check_run_record(out: Path, doc: dict) -> dict:
    """run.json names this run (the id the summary states) and exactly the receipt copies on disk."""
    rec = json.loads((out / "run.json").read_text())
    assert rec["run_id"] == doc["run"]["id"] and rec["exit_code"] == doc["overall"]["exit_code"]
    assert {k: v["sha256"] for k, v in rec["receipts"].items()} == receipt_copies(out)
    for name, v in rec["receipts"].items():  # each copy is the receipt this run's summary lists
        assert (out / name).read_bytes() == (out / v["source"]).read_bytes()
    return rec


def test_reruns_into_one_folder_never_report_an_earlier_run(tmp_path, tiny):
    out = tmp_path / "ci"
    # (a) a passing run, then a run that fails in the workflow (unusable tokenizer): no receipt survives
    p1 = run_cli("--out-dir", str(out), *tiny, *FAST)
    assert p1.returncode == 0, p1.stderr[-3000:]
    d1 = one_document(p1)
    r1 = check_run_record(out, d1)
    assert set(r1["receipts"]) == {"receipt_llama.json"}
    assert "run_id" not in (out / "receipt_llama.json").read_text()  # the id is beside the receipt, not in it
    tok = write(tmp_path / "tokenizer.json", json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}}}))
    p2 = run_cli("--out-dir", str(out), "--tokenizer", tok, *tiny, *FAST)
    assert p2.returncode == 2, p2.stderr[-3000:]
    d2 = one_document(p2)
    assert d2["run"]["id"] != d1["run"]["id"] and d2["overall"]["receipts"] == 0
    assert d2["error"]["kind"] == "bad_input" and d2["error"]["log"].endswith("tokenizer_authority.log")
    assert check_run_record(out, d2)["receipts"] == {} and not receipt_copies(out)
    assert not (out / "results/summary.json").exists()
    assert json.loads((out / "results/summary.failed.json").read_text())["run"]["id"] == d2["run"]["id"]
    # (b) after the failure, a run that passes: its own receipt copy and run id, no failed summary
    p3 = run_cli("--out-dir", str(out), *tiny, *FAST)
    assert p3.returncode == 0, p3.stderr[-3000:]
    d3 = one_document(p3)
    assert "error" not in d3 and not (out / "results/summary.failed.json").exists()
    assert check_run_record(out, d3)["run_id"] not in (d1["run"]["id"], d2["run"]["id"])
    assert json.loads((out / "results/summary.json").read_text())["run"]["id"] == d3["run"]["id"]
    assert json.loads((out / "receipt_llama.json").read_text())["status"] == "pass"
    # a preflight failure into the used folder retires the earlier receipts too
    p4 = run_cli("--out-dir", str(out), "--model-gguf", str(tmp_path / "none.gguf"), *FAST)
    assert p4.returncode == 2
    d4 = one_document(p4)
    assert check_run_record(out, d4)["receipts"] == {} and not receipt_copies(out)


def test_second_run_on_a_busy_folder_exits_2_and_the_first_completes(tmp_path, tiny):
    out = tmp_path / "ci"
    first = subprocess.Popen(
        [*CLI, "--out-dir", str(out), *tiny, *FAST], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    while not (out / "workflow.log").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    p = run_cli("--out-dir", str(out), *tiny, *FAST)
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr.decode()[-3000:]
    assert p.returncode == 2
    assert_error(one_document(p), "busy", "another parity-both run is using")
    assert len(p.stderr.strip().splitlines()) == 1
    d1 = json.loads(stdout)
    check_run_record(out, d1)  # the first run's record and receipt are whole
    assert set(receipt_copies(out)) == {"receipt_llama.json"}


@pytest.mark.slow
def test_plain_snakemake_lock_makes_parity_both_exit_2(tmp_path):
    """A plain `snakemake` run holding the folder: parity-both refuses with Snakemake's lock, one line, exit 2,
    and the snakemake run completes undamaged."""
    out = tmp_path / "ci"
    p0 = run_cli("--out-dir", str(out), "--model-gguf", str(tmp_path / "none.gguf"), *FAST)
    assert p0.returncode == 2
    seed = run_cli("--out-dir", str(out), *FAST)  # writes parity-config.yaml
    assert seed.returncode == 0, seed.stderr[-3000:]
    (out / "results/summary.json").unlink()
    for f in (out / "results/model/receipts").rglob("*.json"):
        f.unlink()
    repo = Path(__file__).resolve().parent.parent
    sm = subprocess.Popen(
        [sys.executable, "-m", "snakemake", "--snakefile", str(repo / "Snakefile"), "--directory", str(out)]
        + ["--configfile", str(out / "parity-config.yaml"), "--cores", "1", "results/summary.json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 120
    locks = out / ".snakemake/locks"
    while not (locks.is_dir() and any(locks.iterdir())) and sm.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p = run_cli("--out-dir", str(out), *FAST)
    log, _ = sm.communicate(timeout=600)
    assert sm.returncode == 0, log.decode()[-3000:]
    assert p.returncode == 2
    assert_error(one_document(p), "busy", "Snakemake's lock")
    assert (out / "results/summary.json").is_file()
