"""`parity-both diff OLD NEW`: the fields that moved between two runs' receipts, through the CLI."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

from parity_both.receipt import content_hash, load_receipt

V2 = Path(__file__).parent / "data" / "receipt_v2.json"
REL = Path("m") / "receipts" / "llama" / "p.json"


def run_diff(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "parity_both.cli", "diff", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    """OLD holds the v2 receipt as written by the v2 code; NEW the same run in v3 shape with one row's KL
    moved and a graph verdict added - the two changes the test then expects to see, and only them."""
    old, new = tmp_path / "old", tmp_path / "new"
    (old / REL).parent.mkdir(parents=True)
    (old / REL).write_text(V2.read_text())
    r = load_receipt(V2)
    del r["upgraded_from_version"]
    r = copy.deepcopy(r)
    r["quantized"]["rows"][1]["kl"] = r["quantized"]["rows"][1]["kl"] + 1e-3
    r["graph"] = {"status": "pass", "positions": 3}
    r["timestamp"] = "2030-01-01T00:00:00Z"  # volatile: never a difference
    r["content_sha256"] = content_hash(r)
    (new / REL).parent.mkdir(parents=True)
    (new / REL).write_text(json.dumps(r))
    return old, new


def test_diff_names_exactly_the_moved_fields(tmp_path):
    old, new = two_runs(tmp_path)
    p = run_diff(str(old), str(new))
    assert p.returncode == 1, p.stderr
    moved = [ln.split() for ln in p.stdout.splitlines() if ln.startswith("  ") and "ignored" not in ln]
    assert sorted((m[1], m[2]) for m in moved) == [
        ("added", "graph.positions"),
        ("changed", "graph.status"),
        ("changed", "quantized.rows[].kl"),
        ("removed", "graph.reason"),
    ]
    assert "content hash identical with nothing ignored: 0/1" in p.stdout


def test_diff_identical_apart_from_ignored_fields(tmp_path):
    old, new = two_runs(tmp_path)
    p = run_diff(str(old), str(new), "--ignore", "graph", "--ignore", "quantized.rows")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "content hash identical apart from the 2 ignored field(s): 1/1" in p.stdout
    assert "ignored  graph: 3 field(s) moved" in p.stdout
    # ignoring only one of the two changes still reports the other
    p = run_diff(str(old), str(new), "--ignore", "graph")
    assert p.returncode == 1 and "quantized.rows[].kl" in p.stdout


def test_diff_bad_input_is_one_line_exit_2(tmp_path):
    old, _ = two_runs(tmp_path)
    p = run_diff(str(old), str(tmp_path / "nope"))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and "does not exist" in p.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    p = run_diff(str(old), str(empty))
    assert p.returncode == 2 and "no receipts in common" in p.stderr
