"""Context limits: a sequence longer than the model's context is refused (exit 2), or cut to fit only on request."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from parity_both.pipeline import InputError, fit_context


def test_prompt_within_context_is_kept_and_stated():
    ids, facts = fit_context(list(range(10)), "p", 16, {"max_tokens": 6, "truncate": False})
    assert ids == list(range(10))
    assert facts == {"n_ctx_train": 16, "max_tokens": 6, "n_prompt_tokens": 10, "truncated_to": None}


def test_prompt_past_context_is_refused_with_the_numbers():
    with pytest.raises(InputError, match=r"is 11 tokens; with max_tokens 6 .* context length 16.*--truncate-prompt"):
        fit_context(list(range(11)), "p", 16, {"max_tokens": 6, "truncate": False})


def test_truncation_only_when_asked_and_recorded():
    ids, facts = fit_context(list(range(40)), "p", 16, {"max_tokens": 6, "truncate": True})
    assert ids == list(range(10)) and facts["truncated_to"] == 10 and facts["n_prompt_tokens"] == 40
    with pytest.raises(InputError, match="context length 16"):  # no room at all even when truncating
        fit_context(list(range(40)), "p", 16, {"max_tokens": 16, "truncate": True})


def test_unknown_context_length_does_not_refuse():
    ids, facts = fit_context(list(range(5000)), "p", 0, {"max_tokens": 8})
    assert len(ids) == 5000 and facts["n_ctx_train"] is None


@pytest.mark.slow
def test_truncated_prompt_passes_and_the_receipt_says_so(tmp_path):
    from parity_both.fixtures import write_fixture

    tiny = tmp_path / "tiny.gguf"
    write_fixture(tiny, arch="llama", weight_type="F32", size="tiny")
    args = ["--model-gguf", str(tiny), "--lanes", "llama", "--max-tokens", "1", "--prompt-template", "raw"]
    args += ["--prompt", "hello world " * 300, "--format", "json", "--out-dir", str(tmp_path / "ci")]
    p = subprocess.run(
        [sys.executable, "-m", "parity_both.cli", *args, "--truncate-prompt"], capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr[-3000:]
    receipt = json.loads((tmp_path / "ci/receipt_llama.json").read_text())
    assert receipt["prompt_context"] == {
        "n_ctx_train": 256,
        "max_tokens": 1,
        "n_prompt_tokens": 601,
        "truncated_to": 255,
    }
    assert receipt["token_parity"]["match"] and receipt["token_parity"]["ref_len"] == 255
