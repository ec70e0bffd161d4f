"""Which jobs rerun after a tokenizer.json edit (issue 2; P5 of the performance issue).

The prompt record is a checkpoint and is checksummed, so an edit that leaves the canonical token ids
unchanged stops there; one that changes a prompt's ids reruns exactly that prompt's jobs. Backends and
the model's SHA-256 never rerun.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import drop_merge_for, jobs_run, snakemake, write_config

PROMPTS = {
    "capital": {"text": "What is the capital of France?", "template": "raw"},
    "code": {"text": "def fibonacci(n):", "template": "raw"},
}


@pytest.fixture(scope="module")
def external_run(tmp_path_factory):
    """A run whose model names an external tokenizer.json (a copy of the GGUF's own, rebuilt)."""
    work = tmp_path_factory.mktemp("rerun")
    from parity_both.config import embedded_model_path
    from parity_both.tokenize.authority import build_authority

    tok = work / "tokenizer.json"
    build_authority(embedded_model_path(), "gguf_embedded", None, str(tok))
    # No twin and no kernel check: what reruns is decided by the prompt records, and the two reference /
    # lane evaluations stand for every evaluation job (tests/test_workflow_e2e.py runs the full set).
    # The tokenizer named relative to the working directory: a copy of this run is up to date as it is.
    model = {"gguf": "embedded", "tokenizer": tok.name, "twin": "off"}
    write_config(work, {"models": {"smol": model}, "prompts": PROMPTS, "max_tokens": 2, "kernels": False})
    snakemake(work)
    return work


def clone(base: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "work"
    shutil.copytree(base, dst, symlinks=True)
    return dst


def _planned(proc) -> set[str]:
    return set(jobs_run(proc))


def test_reformatted_tokenizer_reruns_no_evaluation(external_run, tmp_path):
    work = clone(external_run, tmp_path)
    tok = work / "tokenizer.json"
    tok.write_text(json.dumps(json.loads(tok.read_text()), indent=1))  # same content, new bytes
    dry = snakemake(work, "-n")
    planned = _planned(dry)
    assert "tokenizer_authority" in planned
    assert not planned & {"backend", "model_facts", "lane_vocab"}
    run = snakemake(work)
    ran = jobs_run(run)
    assert "tokenizer_authority" in ran and "format_prompt" in ran
    assert "reference" not in ran and "lane_eval" not in ran, ran
    assert not set(ran) & {"backend", "model_facts"}


def test_edit_changing_one_prompt_reruns_only_that_prompt(external_run, tmp_path):
    work = clone(external_run, tmp_path)
    drop_merge_for(work / "tokenizer.json", PROMPTS["code"]["text"], avoid=(PROMPTS["capital"]["text"],))
    run = snakemake(work, check=False)
    ran = run.stdout + run.stderr
    jobs = jobs_run(run)
    assert jobs.count("reference") == 1 and jobs.count("lane_eval") == 1, jobs
    assert "wildcards: model=smol, prompt=code" in ran or "prompt=code" in ran
    assert not set(jobs) & {"backend", "model_facts", "lane_vocab"}


def test_a_callers_blas_thread_count_reruns_only_the_reference(external_run):
    """OPENBLAS_NUM_THREADS > 1 makes the reference share matmul row blocks out to threads (other block
    shapes, other float32 rounding): the reference rule takes it as a param, so a new count reruns the
    reference jobs (and what reads them: lane evaluations of its sequence, receipts) and nothing upstream."""
    import os

    work = external_run  # dry runs only: nothing written
    other = "3" if os.environ.get("OPENBLAS_NUM_THREADS") == "2" else "2"
    assert not _planned(snakemake(work, "-n")) & {"reference", "lane_eval"}
    planned = _planned(snakemake(work, "-n", env={"OPENBLAS_NUM_THREADS": other}))
    assert "reference" in planned
    assert not planned & {"backend", "model_facts", "tokenizer_authority", "format_prompt", "lane_vocab"}
