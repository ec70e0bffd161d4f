"""Exit codes 4, 5 and 6 through `parity-both` by real failures (a cache on a read-only bind mount, or a
cache path that cannot be a directory; a tree that does not compile; a backend whose build re-enters
parity-both), each with one JSON document on stdout carrying the `error` object. No exit-code variable is
preset: the guard of exit 6 is set by the outer repair itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from parity_both.config import CI_ENV_VARS


def mini_tree(root: Path, body: str) -> Path:
    """A minimal llama.cpp-shaped CMake project whose `llama` target is one C++ file."""
    for d in ("include", "ggml/include", "src"):
        (root / d).mkdir(parents=True)
    (root / "include/llama.h").write_text("#pragma once\nint llama_dummy(void);\n")
    (root / "ggml/include/ggml.h").write_text("#pragma once\n")
    (root / "src/llama.cpp").write_text(f"int llama_dummy(void) {{ return {body}; }}\n")
    (root / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.16)\nproject(mini CXX)\nadd_library(llama SHARED src/llama.cpp)\n"
    )
    return root


def cli_args(tmp_path: Path, cfg: Path, lane: str, out: Path) -> list[str]:
    from parity_both.fixtures import write_fixture

    tiny = tmp_path / "tiny.gguf"
    if not tiny.exists():
        write_fixture(tiny, arch="llama", weight_type="F32", size="tiny")
    args = [sys.executable, "-m", "parity_both.cli", "--model-gguf", str(tiny), "--config", str(cfg)]
    return [
        *args,
        "--lanes",
        lane,
        "--max-tokens",
        "1",
        "--prompt-template",
        "raw",
        "--format",
        "json",
        "--out-dir",
        str(out),
    ]


def run_cli(args: list[str], cache: Path) -> tuple[subprocess.CompletedProcess, dict]:
    env = {k: v for k, v in os.environ.items() if k not in CI_ENV_VARS and not k.startswith("PARITY_BOTH_REPAIR")}
    p = subprocess.run(args, capture_output=True, text=True, env={**env, "PARITY_BOTH_CACHE": str(cache)})
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    return p, json.loads(p.stdout)


def run_lane_tree(tmp_path: Path, tree: Path, cache: Path) -> tuple[subprocess.CompletedProcess, dict]:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump({"backends": {"tree": {"kind": "harness", "source": {"type": "local", "path": str(tree)}}}})
    )
    return run_cli(cli_args(tmp_path, cfg, "tree", tmp_path / "ci"), cache)


@pytest.mark.slow
def test_tree_that_does_not_compile_exits_5(tmp_path):
    p, doc = run_lane_tree(tmp_path, mini_tree(tmp_path / "tree", "this_does_not_compile"), tmp_path / "cache")
    assert p.returncode == 5 and doc["overall"]["exit_code"] == 5, p.stderr[-3000:]
    assert doc["error"]["kind"] == "build" and "compile failed" in doc["error"]["message"]
    assert doc["error"]["log"] == "results/logs/backends/tree.log" and doc["error"]["fix"]
    assert not list((tmp_path / "cache" / "builds").glob("*/*"))  # no half-built backend is kept


@pytest.mark.slow
def test_cache_that_cannot_be_written_exits_4(tmp_path):
    (tmp_path / "a_file").write_text("x")  # the cache path runs through a file: ENOTDIR, even as root
    p, doc = run_lane_tree(tmp_path, mini_tree(tmp_path / "tree", "1"), tmp_path / "a_file" / "cache")
    assert p.returncode == 4 and doc["overall"]["exit_code"] == 4, p.stderr[-3000:]
    assert doc["error"]["kind"] == "permission" and "cannot write" in doc["error"]["message"]
    assert "writable" in doc["error"]["fix"]


@pytest.fixture
def read_only_bind(tmp_path):
    """A directory bind-mounted read-only (EROFS: refused even to root, which ignores modes)."""
    src, mnt = tmp_path / "ro-src", tmp_path / "ro"
    src.mkdir()
    mnt.mkdir()
    p = subprocess.run(["mount", "--bind", str(src), str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {p.stderr.strip()}")
    try:
        p = subprocess.run(["mount", "-o", "remount,bind,ro", str(mnt)], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        yield mnt
    finally:
        assert subprocess.run(["umount", str(mnt)]).returncode == 0


@pytest.mark.slow
def test_cache_on_a_read_only_bind_exits_4(tmp_path, read_only_bind):
    p, doc = run_lane_tree(tmp_path, mini_tree(tmp_path / "tree", "1"), read_only_bind / "cache")
    assert p.returncode == 4 and doc["overall"]["exit_code"] == 4, p.stderr[-3000:]
    assert doc["error"]["kind"] == "permission" and "Read-only file system" in doc["error"]["message"]
    assert list(read_only_bind.iterdir()) == []


@pytest.mark.slow
def test_a_backend_whose_build_reenters_parity_both_exits_6(tmp_path):
    """A command backend whose `build:` step runs `parity-both` on a lane that needs the same backend: the
    inner run's backend job finds a repair already running (the guard the OUTER repair set, inherited
    through Snakemake and the step) and refuses with 6; the outer run reports the nested repair: 6."""
    cfg = tmp_path / "cfg.yaml"
    inner = cli_args(tmp_path, cfg, "outer", tmp_path / "inner-run")
    outer = {"kind": "command", "command": [str(tmp_path / "no-such-engine")], "build": [inner]}
    cfg.write_text(yaml.safe_dump({"repair": "auto", "backends": {"outer": outer}}))
    p, doc = run_cli(cli_args(tmp_path, cfg, "outer", tmp_path / "ci"), tmp_path / "cache")
    assert p.returncode == 6 and doc["overall"]["exit_code"] == 6, p.stderr[-3000:]
    assert doc["error"]["kind"] == "recursion" and "nested repair" in doc["error"]["message"]
    inner_doc = json.loads((tmp_path / "inner-run/results/summary.failed.json").read_text())
    inner_rec = json.loads((tmp_path / "inner-run/results/logs/backends/outer.log.failure.json").read_text())
    assert inner_doc["overall"]["exit_code"] == 6 and inner_rec["exit_code"] == 6
    assert "PARITY_BOTH_REPAIRING=outer" in inner_rec["message"]
    assert not list((tmp_path / "ci").glob("receipt_*.json"))
