"""Receipts of every schema version: v1 validates against its own schema; `parity-both show` prints v1/v2/v3."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_receipt import V1_RECEIPT, _inputs

from parity_both.receipt import build_receipt, load_receipt, validate_v1

SHOW = [sys.executable, "-m", "parity_both.cli", "show"]
V2 = Path(__file__).parent / "data" / "receipt_v2.json"


def test_v1_receipt_validates_against_the_v1_schema():
    validate_v1(V1_RECEIPT)


@pytest.mark.parametrize(
    "edit,where",
    [
        (lambda r: r.pop("rows"), "(top level)"),
        (lambda r: r["rows"][0].update(pos="zero"), "rows/0/pos"),
        (lambda r: r["summary"].update(all_passed="yes"), "summary/all_passed"),
        (lambda r: r.update(backend=7), "backend"),
    ],
)
def test_malformed_v1_receipt_is_refused_with_the_field(tmp_path, edit, where):
    bad = copy.deepcopy(V1_RECEIPT)
    edit(bad)
    p = tmp_path / "r.json"
    p.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=re.escape(f"not a valid v1 receipt: {where}")):
        load_receipt(p)


def test_show_prints_v1_v2_and_v3_receipts(tmp_path):
    v1 = tmp_path / "receipt_v1.json"
    v1.write_text(json.dumps(V1_RECEIPT))
    v3 = tmp_path / "receipt_v3.json"
    r3 = build_receipt(**_inputs())
    r3["backend"] = "llama-v3"
    v3.write_text(json.dumps(r3))
    p = subprocess.run([*SHOW, str(v1), str(V2), str(v3)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "Lane A: bitnet" in p.stdout and "llama-v3" in p.stdout and "Exit code:        0" in p.stdout
    assert "upgraded from receipt schema v1, v2 to v3" in p.stdout
    p = subprocess.run([*SHOW, "--format", "json", str(v1)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    lane = json.loads(p.stdout)["models"]["models/model.gguf"]["lanes"]["bitnet"]
    assert lane["prompts"]["What is 2+2?"]["upgraded_from_version"] == 1


def test_show_refuses_a_non_receipt_in_one_line(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("[1]")
    out = subprocess.run([*SHOW, str(p)], capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        f"parity-both: error: {p}: {p} is not a parity receipt (no 'version' field)"
    ]
