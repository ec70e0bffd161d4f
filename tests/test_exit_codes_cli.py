"""Exit codes 4 and 5 through `parity-both` by real failures (a cache path that cannot be a directory; a
tree that does not compile), each with one JSON document on stdout carrying the `error` object."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


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


def run_lane_tree(tmp_path: Path, tree: Path, cache: Path) -> tuple[subprocess.CompletedProcess, dict]:
    from parity_both.fixtures import write_fixture

    tiny = tmp_path / "tiny.gguf"
    write_fixture(tiny, arch="llama", weight_type="F32", size="tiny")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump({"backends": {"tree": {"kind": "harness", "source": {"type": "local", "path": str(tree)}}}})
    )
    args = ["--model-gguf", str(tiny), "--config", str(cfg), "--lanes", "tree", "--max-tokens", "1"]
    args += ["--prompt-template", "raw", "--format", "json", "--out-dir", str(tmp_path / "ci")]
    env = {**os.environ, "PARITY_BOTH_CACHE": str(cache)}
    p = subprocess.run([sys.executable, "-m", "parity_both.cli", *args], capture_output=True, text=True, env=env)
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    return p, json.loads(p.stdout)


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
