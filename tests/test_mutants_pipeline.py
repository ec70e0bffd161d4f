"""Planted-bug engines through `parity-both` (issues 10 and 11): each fails with exit 1 and its receipt names
where - the graph verdict's localization (layer and node) for graph bugs, the kernel check's first failing
node, op and weight type for kernel bugs. The expectations are where the test planted each bug
(tests/mutants/table.py: the patched line and the node it feeds), not what the code under test computes.

Engines: copies of the October-2024 llama.cpp tree (the `llama-2024` lane's) with a one-line patch, built once
per patch into the project cache and run as local-source lanes. Two run in the default suite (as two lanes of one
run); the rest are slow (`make test-slow`), one run each.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from mutants import backend_config, lane_name, mutant_build

# mutant -> (kind, first node localization / the kernel check must name, its op, the weight type for kernels)
EXPECT: dict[str, tuple[str, str, str, str | None]] = {
    "rope-base": ("graph", "Qcur-0", "ROPE", None),
    "kq-scale": ("graph", "kq_soft_max_ext-0", "SOFT_MAX", None),
    "causal-mask": ("graph", "kq_soft_max_ext-0", "SOFT_MAX", None),
    "silu-gelu": ("graph", "ffn_silu-0", "GELU", None),
    "q4_1-min-scaled": ("kernel", "Qcur-0", "MUL_MAT", "Q4_1"),
    "q4_1-min-subtle": ("kernel", "Qcur-0", "MUL_MAT", "Q4_1"),
    "q4_1-scale-wrong-block": ("kernel", "Qcur-0", "MUL_MAT", "Q4_1"),
    "q8_0-dequant-wrong-block": ("kernel", "inp_embd", "GET_ROWS", "Q8_0"),
}
DEFAULT = ("rope-base", "kq-scale")
PROMPT = "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined"


def run_mutants(names: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict[str, dict[str, Any]]]:
    """One `parity-both` run with every named mutant as a lane (they share the reference, the twin and its
    reference); each lane's receipt by mutant name."""
    for name in names:
        mutant_build(name)  # cached per patch: the workflow's backend job finds it built
    lanes = [lane_name(n) for n in names]
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump({"lanes": lanes, "backends": {lane_name(n): backend_config(n) for n in names}, "repair": "auto"})
    )
    out = tmp_path / "ci"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "parity_both.cli",
            "--config",
            str(cfg),
            "--out-dir",
            str(out),
            "--lanes",
            ",".join(lanes),
            "--prompt",
            PROMPT,
            "--prompt-template",
            "raw",
            "--max-tokens",
            "4",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    receipts = {n: json.loads((out / f"receipt_{lane_name(n)}.json").read_text()) for n in names}
    return proc, receipts


def check(name: str, proc: subprocess.CompletedProcess, r: dict[str, Any]) -> None:
    kind, node, op, wtype = EXPECT[name]
    print(
        f"\nWHAT-IT-CATCHES {name}: "
        + json.dumps(
            {
                "graph": {"status": r["graph"]["status"], "mean_kl": r["graph"].get("summary", {}).get("mean_kl")},
                "quantized": {"status": r["quantized"]["status"], "mean_kl": r["quantized"]["summary"].get("mean_kl")},
                "localization": {
                    k: (r.get("localization") or {}).get(k) for k in ("status", "first_layer", "first_node")
                },
                "kernels": {"first": r["kernels"].get("first_failure"), "diagnosis": r["kernels"].get("diagnosis")},
            },
            sort_keys=True,
            default=str,
        )
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["overall"]["exit_code"] == 1
    k = r["kernels"]
    assert k["status"] == "fail", k["diagnosis"]
    first = k["first_failure"]
    assert (first["name"], first["op"]) == (node, op), first
    if kind == "graph":
        assert r["graph"]["status"] == "fail"
        loc = r["localization"]
        assert loc["status"] == "departs" and loc["first_layer"] == 0
        assert loc["first_node"]["name"] == node, loc["first_node"]
        assert any(node in h for h in r["summary"]["hints"])
    else:  # the twin runs no quantized kernel: the graph verdict passes, the kernel check names the weight type
        assert r["graph"]["status"] == "pass"
        assert first["weight_type"] == wtype and wtype in k["diagnosis"]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict[str, Any]]:
    """The default mutants as two lanes of one run (exit 1 there: every lane fails)."""
    return run_mutants(list(DEFAULT), tmp_path_factory.mktemp("mutants"))


@pytest.mark.parametrize("name", DEFAULT)
def test_graph_mutant_fails_with_layer_and_node_named(name: str, default_run) -> None:
    proc, receipts = default_run
    check(name, proc, receipts[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in EXPECT if n not in DEFAULT])
def test_every_mutant_fails_at_its_node(name: str, tmp_path: Path) -> None:
    proc, receipts = run_mutants([name], tmp_path)
    check(name, proc, receipts[name])
