"""A smoke run of the benchmark: every row is measured and printed (timings are reported, never
asserted: speed targets are checked by `make bench`, not by tests). The rerun rows (P5) are
behaviour, not timing, so they must pass."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_smoke_prints_every_measure(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run(
        [sys.executable, str(REPO / "bench/bench.py"), "--smoke", "--lanes", "llama", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    rows = {r["id"]: r for r in json.loads(out.read_text())}
    assert {"P1", "P2a", "P2b", "P3", "P4", "P5a", "P5b", "P6"} <= set(rows), p.stdout + p.stderr[-3000:]
    assert rows["P5a"]["result"] == "PASS" and rows["P5b"]["result"] == "PASS", rows
    assert "P1" in p.stdout and "target" in p.stdout
