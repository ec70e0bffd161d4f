"""Backends as rebuild rules, through the real workflow and the `parity-both` command: a vanished
build is repaired by rerunning exactly its backend and lane jobs; failures map to the seed's exit
codes with one clear paragraph; the two offline lanes run in parallel and pass."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from parity_both.provision.probes import harness_dirs
from parity_both.provision.specs import effective_spec, lane_spec

from conftest import jobs_run, snakemake, write_config

PROMPT = {"capital": {"text": "What is the capital of France?", "template": "raw"}}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A backend cache holding a built llama-2024 lane: $PARITY_BOTH_TEST_CACHE's (copied, so this
    module may delete builds) or a fresh one built here."""
    dst = tmp_path_factory.mktemp("cache") / "parity-both"
    src = os.environ.get("PARITY_BOTH_TEST_CACHE")
    if src and Path(src, "builds").is_dir():
        for sub in ("builds", "sources"):
            for entry in Path(src, sub).glob("*") if Path(src, sub).is_dir() else []:
                if entry.name.startswith(("llama-2024-", "sdist-llama-cpp-python-0.3.1")):
                    shutil.copytree(entry, dst / sub / entry.name, symlinks=True)
    dst.mkdir(parents=True, exist_ok=True)
    return dst


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = {"PARITY_BOTH_CACHE": str(cache), "PARITY_BOTH_REPAIR": "auto"}
    env.update(extra)
    return env


# What vanishes before the rerun. The harness (the lane's C++ program, ~10 s to rebuild) goes through the
# same probe -> backend job -> lane jobs path as the whole build; the whole build (the engine too, a full
# llama.cpp compile of minutes on 2 cores) is `make test-slow`: the default suite runs on a warm cache.
VANISHED = [
    pytest.param("harness", id="harness-vanished"),
    pytest.param("build", id="build-vanished", marks=pytest.mark.slow),
]


def lane_build(cache: Path) -> tuple[Path, Path]:
    """(the llama-2024 lane's engine build, its harness build) in this cache, as the lane's probe finds them."""
    return harness_dirs(effective_spec(lane_spec("llama-2024")), cache)


def vanish(cache: Path, what: str) -> None:
    root, harness = lane_build(cache)
    assert (root / "engine.json").is_file() and (harness / "harness.json").is_file(), root
    if what == "build":
        for build in (cache / "builds").glob("llama-2024-*"):
            shutil.rmtree(build)
    else:
        shutil.rmtree(harness)


@pytest.mark.parametrize("what", VANISHED)
def test_two_offline_lanes_in_parallel_pass(cache, tmp_path, what):
    work = tmp_path / "w"
    work.mkdir()
    write_config(
        work,
        {
            "models": {"smol": {"gguf": "embedded"}},
            "prompts": PROMPT,
            "max_tokens": 2,
            "lanes": ["llama-2024", "llama"],
        },
    )
    snakemake(work, "--cores", "2", env=_env(cache))
    s = json.loads((work / "results/summary.json").read_text())
    assert s["overall"]["exit_code"] == 0 and set(s["lanes"]) == {"llama", "llama-2024"}, s
    r = json.loads((work / "results/smol/receipts/llama-2024/capital.json").read_text())
    ident = r["backend_identity"]
    assert ident["kind"] == "harness" and ident["api_generation"] == "2024-10"
    assert r["determinism"]["lane"]["type_v"] in ("f16", "f32")  # recorded, whichever the engine allowed
    assert r["tokenizer_consistent"] is True

    # A vanished build: the next run rebuilds exactly that backend and reruns only that lane's jobs.
    vanish(cache, what)
    proc = snakemake(work, "--cores", "2", env=_env(cache))
    ran = jobs_run(proc)
    out = proc.stdout + proc.stderr
    assert ran.count("backend") == 1 and "lane=llama-2024" in out
    assert "lane=llama," not in out and "lane=llama\n" not in out
    assert not {"reference", "model_facts", "tokenizer_authority", "prepare_reference"} & set(ran), ran
    assert {"lane_eval", "lane_vocab", "receipt", "summary"} <= set(ran)
    root, harness = lane_build(cache)
    assert (root / "engine.json").is_file() and (harness / "harness.json").is_file()


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "parity_both.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=900,
    )


def test_repair_disabled_with_backend_missing_exits_2_with_the_repair_command(tmp_path):
    empty = tmp_path / "empty-cache"
    out = tmp_path / "ci"
    p = run_cli(
        ["--lanes", "llama-2024", "--no-repair", "--max-tokens", "1", "--out-dir", str(out)],
        {"PARITY_BOTH_CACHE": str(empty), "PARITY_BOTH_REPAIR": ""},
    )
    assert p.returncode == 2, p.stderr[-3000:]
    assert "llama-2024" in p.stderr and "parity_both.provision.backends provision llama-2024" in p.stderr
    assert not list(out.glob("receipt_*.json"))
    assert not list(empty.glob("builds/llama-2024-*")) if empty.exists() else True


def test_ci_environment_defaults_to_no_repair(tmp_path):
    empty = tmp_path / "empty-cache"
    out = tmp_path / "ci"
    p = run_cli(
        ["--lanes", "llama-2024", "--max-tokens", "1", "--out-dir", str(out)],
        {"PARITY_BOTH_CACHE": str(empty), "PARITY_BOTH_REPAIR": "", "CI": "true"},
    )
    assert p.returncode == 2, p.stderr[-3000:]
    assert "repair is disabled (CI environment detected: CI is set)" in p.stderr, p.stderr[-3000:]
    assert "parity_both.provision.backends provision llama-2024" in p.stderr


def test_unreachable_git_source_exits_3_after_retries(tmp_path):
    cfg = tmp_path / "extra.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "backends": {
                    "remote": {
                        "kind": "harness",
                        "recipe": "llama.cpp",
                        "source": {"type": "git", "url": "https://127.0.0.1:9/llama.cpp.git", "commit": "0" * 40},
                    }
                }
            }
        )
    )
    out = tmp_path / "ci"
    p = run_cli(
        [
            "--lanes",
            "remote,llama",
            "--config",
            str(cfg),
            "--max-tokens",
            "1",
            "--out-dir",
            str(out),
            "--format",
            "json",
        ],
        {"PARITY_BOTH_CACHE": str(tmp_path / "c"), "PARITY_BOTH_REPAIR": "auto", "PARITY_BOTH_FETCH_BACKOFF": "0.1"},
    )
    assert p.returncode == 3, p.stderr[-3000:]
    summary = json.loads(p.stdout)
    assert summary["overall"]["exit_code"] == 3 and summary["errors"][0]["exit_code"] == 3
    assert "log:" in p.stderr and "remote" in p.stderr
    # --keep-going: the other lane's receipt is still produced
    assert json.loads((out / "receipt_llama.json").read_text())["status"] == "pass"
    assert not list((tmp_path / "c").glob("sources/*remote*")) if (tmp_path / "c").exists() else True
