"""Shared fixtures: the embedded model, and running the real workflow in a scratch directory."""

from __future__ import annotations

import os
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


def snakemake(workdir: Path, *args: str, check: bool = True, env: dict[str, str] | None = None,
              timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the real workflow with its working directory in `workdir` (config.yaml there)."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--profile", str(REPO / "profiles" / "default"), *args]
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
                out.append(s[len(kw):-1])
    return [j for j in out if j != "all"]
