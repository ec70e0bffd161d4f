"""Shared fixtures: the embedded model, and running the real workflow in a scratch directory."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def smol_path() -> str:
    from parity_both.config import embedded_model_path

    return embedded_model_path()


def write_config(workdir: Path, cfg: dict[str, Any]) -> Path:
    base = {"standalone": True, "max_tokens": 4, "lanes": ["llama"], "threads": 1, "out_dir": "results"}
    base.update(cfg)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=True))
    return path


def snakemake(
    workdir: Path, *args: str, check: bool = True, env: dict[str, str] | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    """Run the real workflow with its working directory in `workdir` (config.yaml there)."""
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        "--profile",
        str(REPO / "profiles" / "default"),
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def jobs_run(proc: subprocess.CompletedProcess) -> list[str]:
    """Rule names of the jobs a real run executed, from Snakemake's log ('rule X:' / 'checkpoint X:')."""
    out = []
    for line in (proc.stdout + proc.stderr).splitlines():
        s = line.strip()
        for kw in ("rule ", "checkpoint ", "localrule ", "localcheckpoint "):
            if s.startswith(kw) and s.endswith(":"):
                out.append(s[len(kw) : -1])
    return [j for j in out if j != "all"]


def drop_merge_for(tokenizer_json: Path, text: str, avoid: tuple[str, ...] = ()) -> str:
    """Edit a byte-level BPE tokenizer.json so that `text` tokenizes differently: remove the merge that
    forms one of its multi-character pieces (one not in any `avoid` text). Returns the removed piece."""
    import json

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    avoid_pieces = {p for t in avoid for p in tok.encode(t, add_special_tokens=False).tokens}
    pieces = [p for p in tok.encode(text, add_special_tokens=False).tokens if len(p) > 2 and p not in avoid_pieces]
    assert pieces, f"no removable piece in {text!r}"
    target = pieces[0]
    data = json.loads(tokenizer_json.read_text())
    merges = data["model"]["merges"]

    def joined(m):
        return "".join(m) if isinstance(m, list) else m.replace(" ", "", 1)

    data["model"]["merges"] = [m for m in merges if joined(m) != target]
    assert len(data["model"]["merges"]) == len(merges) - 1, target
    tokenizer_json.write_text(json.dumps(data))
    return target


def llama_cpp_model(
    path: Path | str,
    *,
    n_ctx: int = 64,
    n_threads: int = 2,
    vocab_only: bool = False,
    use_extra_bufts: bool | None = None,
) -> Any:
    """A real llama-cpp-python model built exactly as the `llama` lane builds it (parity settings: F32 K/V,
    flash attention off, one batch of n_ctx; parity_both.lanes.llama_cpp_python.open_llama). Like the
    lane, use_extra_bufts=None keeps the engine's default (weight repacking on); a test that needs the
    plain CPU buffers passes use_extra_bufts=False and says why."""
    from parity_both.lanes.llama_cpp_python import open_llama

    return open_llama(path, n_ctx=n_ctx, threads=n_threads, vocab_only=vocab_only, use_extra_bufts=use_extra_bufts)


def llama_cpp_logits(
    path: Path | str, ids: list[int], n_threads: int = 2, *, use_extra_bufts: bool | None = None
) -> Any:
    """All-position logits for `ids` from llama-cpp-python (one batch, fresh cache), the lane's settings."""
    import numpy as np

    llm = llama_cpp_model(path, n_ctx=max(64, len(ids)), n_threads=n_threads, use_extra_bufts=use_extra_bufts)
    try:
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


# ---------------------------------------------------------------------------- backend builds (faults, trust)


def engine_2024_root(fallback_cache: Path) -> Path:
    """A whole October-2024 llama.cpp engine build (lib/, include/): the test cache's, else built here."""
    from parity_both.provision.build import engine_build_problem
    from parity_both.provision.provision import provision_backend
    from parity_both.provision.specs import BUILTIN_SPECS

    for env in ("PARITY_BOTH_TEST_CACHE", "PARITY_BOTH_CACHE"):
        for root in sorted(Path(os.environ.get(env) or "/nonexistent", "builds").glob("llama-2024-*")):
            if engine_build_problem(root) is None:
                return root
    provision_backend(BUILTIN_SPECS["llama-2024"], fallback_cache, fallback_cache / "build.log", "auto")
    return next((fallback_cache / "builds").glob("llama-2024-*"))


@pytest.fixture(scope="module")
def engine_2024(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return engine_2024_root(tmp_path_factory.mktemp("engine-2024"))


def slow_tree(root: Path, engine: Path, seconds: float) -> Path:
    """A llama.cpp-shaped tree whose `llama` target takes `seconds`, then yields `engine`'s libraries."""
    shutil.copytree(engine / "include", root / "include")
    (root / "ggml" / "include").mkdir(parents=True)
    (root / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.16)\nproject(slow NONE)\n"
        "add_custom_target(llama ALL\n"
        f"  COMMAND ${{CMAKE_COMMAND}} -E sleep {seconds}\n"
        f'  COMMAND ${{CMAKE_COMMAND}} -E copy_directory "{engine / "lib"}" "${{CMAKE_BINARY_DIR}}/out"\n'
        "  VERBATIM)\n"
    )
    return root


def partial_dirs(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.name.startswith((".tmp-", ".trash-")))


def kill_session(sid: int) -> None:
    """SIGKILL every process of the session (ninja runs each command in its own process group, so
    killing the group would leave the compile running: a crashed node leaves nothing running)."""
    ps = subprocess.run(["ps", "-o", "pid=", "-s", str(sid)], capture_output=True, text=True, check=True)
    for pid in sorted({int(x) for x in ps.stdout.split()}):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
