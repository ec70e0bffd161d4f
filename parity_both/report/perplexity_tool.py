"""`llama-perplexity` built from the llama-2024 lane's own llama.cpp tree, cached under PARITY_BOTH_CACHE.

The lane's engine record (builds/llama-2024-*/engine.json) names the source tree and the CMake flags it was
built with; the tool is built from the same tree with the same flags, static (relocatable: one binary, no
library path), examples on, target llama-perplexity only. Built once under the cache's build lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from parity_both.provision.lock import build_lock

TOOL = "llama-perplexity"


def cache_dir() -> Path:
    return Path(os.environ.get("PARITY_BOTH_CACHE") or Path.home() / ".cache" / "parity-both")


def lane_engine_record(cache: Path, lane: str = "llama-2024") -> dict:
    records = sorted((cache / "builds").glob(f"{lane}-*/engine.json"))
    if not records:
        raise FileNotFoundError(f"no {lane} engine build under {cache}/builds: run the lane once (make demo)")
    return json.loads(records[-1].read_text())


def tool_cmake_args(engine: dict) -> list[str]:
    drop = ("-DBUILD_SHARED_LIBS", "-DLLAMA_BUILD_EXAMPLES", "-DCMAKE_INSTALL_RPATH", "-DCMAKE_BUILD_WITH_INSTALL")
    args = [a for a in engine["cmake_args"] if not a.startswith(drop)]
    return [*args, "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_EXAMPLES=ON"]


def ensure_perplexity(cache: Path | None = None, jobs: int = 2, log=None) -> Path:
    """The path of llama-perplexity for the llama-2024 tree, building it (a few minutes) when missing."""
    cache = cache or cache_dir()
    engine = lane_engine_record(cache)
    src = Path(engine["source_dir"])
    args = tool_cmake_args(engine)
    key = hashlib.sha256(json.dumps([engine.get("sdist_sha256"), str(src), args]).encode()).hexdigest()[:16]
    final = cache / "tools" / f"{TOOL}-{key}"
    binary = final / "bin" / TOOL
    if binary.is_file():
        return binary
    with build_lock(cache, f"{TOOL}-{key}"):
        if binary.is_file():  # built by another job while we waited
            return binary
        build = cache / "tools" / f".build-{TOOL}-{key}"
        shutil.rmtree(build, ignore_errors=True)
        log_path = cache / "tools" / f"{TOOL}-{key}.build.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with open(log_path, "w") as logf:
            for cmd in (
                ["cmake", "-S", str(src), "-B", str(build), *args],
                ["cmake", "--build", str(build), "--target", TOOL, "-j", str(jobs)],
            ):
                subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, check=True)
        built = next(p for p in build.rglob(TOOL) if p.is_file() and os.access(p, os.X_OK))
        tmp = cache / "tools" / f".tmp-{TOOL}-{key}"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "bin").mkdir(parents=True)
        shutil.copy2(built, tmp / "bin" / TOOL)
        record = {
            "source_dir": str(src),
            "sdist_sha256": engine.get("sdist_sha256"),
            "cmake_args": args,
            "target": TOOL,
            "seconds": round(time.monotonic() - t0, 1),
        }
        (tmp / "tool.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        os.rename(tmp, final)
        shutil.rmtree(build, ignore_errors=True)
    return binary


_MEAN_KLD = re.compile(r"Mean\s+KLD:\s+([-+0-9.eE]+)\s+±\s+([-+0-9.eE]+)")
_SAME_TOP = re.compile(r"Same top p:\s+([-+0-9.eE]+)\s+±\s+([-+0-9.eE]+)\s+%")


def run_kl_divergence(
    binary: Path, model: Path, base: Path, n_ctx: int, threads: int = 2, cache_type_k: str = "f32"
) -> dict:
    """Run `llama-perplexity --kl-divergence` of model against base; return its mean KLD and same-top rate.
    cache_type_k: f32 as the harness lanes evaluate (llama-perplexity's default f16 K cache rounds keys)."""
    cmd = [
        str(binary),
        "-m",
        str(model),
        "--kl-divergence-base",
        str(base),
        "--kl-divergence",
        "-c",
        str(n_ctx),
        "-b",
        str(n_ctx),
        "-t",
        str(threads),
        "-ctk",
        cache_type_k,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-3000:]}")
    m = _MEAN_KLD.search(out)
    if not m:
        raise RuntimeError(f"no 'Mean KLD' in llama-perplexity's output:\n{out[-3000:]}")
    s = _SAME_TOP.search(out)
    return {
        "mean_kld": float(m.group(1)),
        "mean_kld_uncertainty": float(m.group(2)),
        "same_top": float(s.group(1)) / 100 if s else None,
        "command": cmd,
        "output": out,
    }
