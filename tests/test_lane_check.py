"""`parity-both lane-check` (issue 15): a program that keeps the lane protocol passes every rule; a
program that breaks one (wrong logits shape, NaN, nondeterminism, a wrong exit code) fails with a line
naming that rule. Every status line is validated against schemas/lane-status.schema.json."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from parity_both.config import embedded_model_path
from parity_both.lanecheck import run_checks
from parity_both.lanes.command import status_errors
from parity_both.provision.harness import run_program

REPO = Path(__file__).resolve().parent.parent
TOY = [sys.executable, str(REPO / "tools" / "lane_programs" / "toy_engine.py")]


def lane_check(tmp_path: Path, backends: dict, name: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"backends": backends}))
    return subprocess.run(
        [sys.executable, "-m", "parity_both.cli", "lane-check", "--backend", name, "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_a_conforming_program_passes_every_rule(tmp_path):
    proc = lane_check(tmp_path, {"toy": {"kind": "command", "command": TOY}}, "toy")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1].startswith("19/19 rules pass"), proc.stdout
    for rule in (
        "info-protocol",
        "bad-input-token-id",
        "tokenize-special",
        "eval-shape",
        "eval-finite",
        "eval-deterministic",
        "eval-causal",
        "status-lines",
    ):
        assert any(ln.split()[:2] == [rule, "pass"] for ln in lines), (rule, proc.stdout)


@pytest.fixture(scope="module")
def harness_2024(tmp_path_factory) -> str:
    """The C++ harness against llama.cpp of October 2024 ($PARITY_BOTH_TEST_CACHE's build, else built)."""
    import os

    from parity_both.provision.backends import BUILTIN_SPECS, provision_backend

    cache = Path(os.environ.get("PARITY_BOTH_TEST_CACHE") or tmp_path_factory.mktemp("pb-cache"))
    log = tmp_path_factory.mktemp("logs") / "llama-2024.log"
    return provision_backend(BUILTIN_SPECS["llama-2024"], cache, log, "auto")["harness_path"]


def test_the_harness_status_lines_follow_the_schema(harness_2024, tmp_path):
    model = embedded_model_path()
    (tmp_path / "t.txt").write_text("Hello <|im_start|>")
    np.asarray([1, 2, 3], "<i4").tofile(tmp_path / "ok.i32")
    np.asarray([1, 10**6], "<i4").tofile(tmp_path / "bad.i32")
    ok, bad = str(tmp_path / "ok.i32"), str(tmp_path / "bad.i32")
    requests = {
        "info": (0, ["info"]),
        "vocab": (0, ["vocab", "--model", model, "--out", str(tmp_path / "v.tsv")]),
        "tokenize": (0, ["tokenize", "--model", model, "--text-file", str(tmp_path / "t.txt"), "--parse-special", "1"]),
        "eval": (0, ["eval", "--model", model, "--ids-file", ok, "--out", str(tmp_path / "l")]),
        "bad id": (2, ["eval", "--model", model, "--ids-file", bad, "--out", str(tmp_path / "l")]),
        "usage": (1, ["nonsense"]),
    }
    for what, (code, args) in requests.items():
        res = run_program([harness_2024, *args])
        assert res.returncode == code and len(res.lines) == 1 and res.status is not None, (what, res)
        assert status_errors(res.status) == [], (what, res.status)
        assert res.status["exit_code"] == code, (what, res.status)
    assert run_program([harness_2024, "info"]).status["protocol"] == 1


def test_the_schema_rejects_malformed_status_lines():
    assert status_errors({"ok": True, "exit_code": 0, "command": "info"})  # no protocol
    assert status_errors({"ok": False, "exit_code": 2, "command": "eval"})  # no stage/error
    assert status_errors({"ok": True, "exit_code": 3, "command": "tokenize", "ids": []})  # ok with exit 3
    assert status_errors(
        {"ok": True, "exit_code": 0, "command": "eval", "n_tokens": 1, "n_vocab": 9, "settings": {"threads": 1}}
    )  # settings without n_ctx, n_batch, type_k, type_v
    assert not status_errors({"ok": True, "exit_code": 0, "command": "tokenize", "ids": [1, 2]})


def failed(defect: str) -> dict[str, str]:
    rules = run_checks([*TOY, "--defect", defect], embedded_model_path())
    return {r.name: r.detail for r in rules if not r.ok}


def test_nan_logits_fail_the_finiteness_rule():
    bad = failed("nan")
    assert set(bad) == {"eval-finite"}, bad
    assert "1 NaN/inf" in bad["eval-finite"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("defect", "rules", "says"),
    [
        ("shape", {"eval-shape"}, "got 737265 values"),
        ("nondet", {"eval-deterministic"}, "bitwise the same logits"),
        (
            "exit",
            {"bad-input-model", "bad-input-ids-file", "bad-input-token-id"},
            "want exit 2 with ok=false; got exit 3",
        ),
    ],
)
def test_broken_programs_fail_the_rule_they_break(defect, rules, says):
    bad = failed(defect)
    assert rules <= set(bad), bad
    assert all(says in bad[r] for r in rules), bad
    if defect == "shape":  # what depends on the logits is not judged on a wrong-shaped file
        assert set(bad) == rules | {"eval-finite", "eval-deterministic", "eval-causal"}, bad
    else:
        assert set(bad) == rules, bad


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["llama-2024", "engine-llama", "engine-reference"])
def test_the_harness_and_the_engine_programs_conform(tmp_path, backend):
    py = [sys.executable, "-m"]
    backends = {
        "engine-llama": {"kind": "command", "command": [*py, "parity_both.lanes.llama_engine"]},
        "engine-reference": {"kind": "command", "command": [*py, "parity_both.lanes.reference_engine"]},
    }
    proc = lane_check(tmp_path, backends, backend)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == "19/19 rules pass", proc.stdout
