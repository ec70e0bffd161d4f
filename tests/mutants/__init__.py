"""Planted-bug engines for the mutation suite: the table (``table.py``) and a cached builder.

``mutant_tree(name)`` makes a copy of the October-2024 llama.cpp tree (the ``llama-2024`` lane's own
source, fetched the way that lane fetches it) with one patch applied, under
``$PARITY_BOTH_TEST_CACHE`` (default ``~/.cache/parity-both``) ``/mutants/<name>-<patch hash>/tree``:
hard links (``cp -al``) for every file but the patched one, which is a real copy. Its path depends
only on the patch, so the backend build of the local-source lane (``mutant_spec``) is keyed the same
in every test session and done once per mutant (``mutant_build``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from parity_both.provision import backends as B
from parity_both.provision.build import Progress
from parity_both.provision.fetch import ensure_source
from parity_both.provision.harness import HarnessBuild

from .table import MUTANTS, Mutant

__all__ = [
    "MUTANTS",
    "Mutant",
    "apply_patch",
    "backend_config",
    "cache_root",
    "honest_tree",
    "lane_name",
    "mutant_build",
    "mutant_spec",
    "mutant_tree",
    "mutants_cache",
    "verify_patches",
]

# Top-level entries of the llama.cpp tree the `llama` target's configure + build never reads
# (LLAMA_BUILD_TESTS/EXAMPLES are off in ENGINE_BASE_CMAKE_ARGS); left out of the copies.
_NOT_NEEDED = {
    "models",
    "docs",
    "media",
    "examples",
    "tests",
    "gguf-py",
    "pocs",
    ".github",
    "ci",
    ".parity-both-source.json",
}
_SOURCE_NOTE = ".parity-both-source.json"  # merged into the engine record by the backend build


def cache_root() -> Path:
    return Path(os.environ.get("PARITY_BOTH_TEST_CACHE") or Path.home() / ".cache" / "parity-both").expanduser()


def mutants_cache() -> Path:
    return cache_root() / "mutants"


def honest_tree() -> Path:
    """The unpatched tree: the ``llama-2024`` lane's own source (its sdist, fetched as the lane fetches
    it, from $PARITY_BOTH_SDIST_DIR when that holds it), so mutant and honest lanes differ by the patch
    only."""
    spec = B.BUILTIN_SPECS["llama-2024"]
    cache = cache_root()
    log = cache / "mutants" / "honest-source.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    return ensure_source(spec, cache, log, retries=3, backoff=2.0, progress=Progress("llama-2024 source"))


def apply_patch(m: Mutant, text: str) -> str:
    """``text`` with the mutant's patch applied; ValueError unless ``old`` occurs exactly once."""
    n = text.count(m.old)
    if n != 1:
        raise ValueError(f"mutant {m.name}: the old text occurs {n} times in {m.file} (want 1)")
    return text.replace(m.old, m.new)


def verify_patches(tree: Path | None = None) -> dict[str, int]:
    """{mutant: occurrences of its old text} over the honest tree (every value must be 1)."""
    tree = tree or honest_tree()
    return {name: (tree / m.file).read_text().count(m.old) for name, m in sorted(MUTANTS.items())}


def _link_copy(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    entries = sorted(p for p in src.iterdir() if p.name not in _NOT_NEEDED)
    proc = subprocess.run(["cp", "-al", *map(str, entries), str(dest)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise OSError(f"cp -al {src} -> {dest} failed ({proc.returncode}): {proc.stderr.strip()}")


def mutant_tree(name: str) -> Path:
    """The patched tree of mutant ``name`` (created once, atomically; reused afterwards)."""
    m = MUTANTS[name]
    final = mutants_cache() / f"{name}-{m.digest()[:16]}"
    tree = final / "tree"
    if (final / "mutant.json").is_file():
        return tree
    src = honest_tree()
    patched = apply_patch(m, (src / m.file).read_text())
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=final.parent))
    try:
        _link_copy(src, tmp / "tree")
        target = tmp / "tree" / m.file
        target.unlink()  # a hard link to the honest file: replace it, never write through it
        target.write_text(patched)
        (tmp / "tree" / _SOURCE_NOTE).write_text(
            json.dumps({"mutant": name, "mutant_patch_sha256": m.digest()}, sort_keys=True) + "\n"
        )
        record = {
            "name": name,
            "file": m.file,
            "kind": m.kind,
            "patch_sha256": m.digest(),
            "honest_tree": str(src),
            "old": m.old,
            "new": m.new,
        }
        (tmp / "mutant.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "mutant.json").is_file():  # not a concurrent creator's result: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tree


def lane_name(name: str) -> str:
    return f"mut-{name}"


def mutant_spec(name: str) -> B.BackendSpec:
    """The local-source harness lane spec of mutant ``name`` (the same as the config mapping
    ``backends: {mut-NAME: {kind: harness, source: {type: local, path: TREE}}}``)."""
    return B.BackendSpec(
        name=lane_name(name), kind="harness", source=B.SourceSpec(type="local", path=str(mutant_tree(name)))
    )


def backend_config(name: str) -> dict[str, object]:
    """The ``backends:`` entry for a pipeline config."""
    return {"kind": "harness", "source": {"type": "local", "path": str(mutant_tree(name))}}


def mutant_build(name: str, *, jobs: int = 2) -> HarnessBuild:
    """Provision (build once, then reuse from the cache) the mutant's engine + harness."""
    spec = mutant_spec(name)
    log = mutants_cache() / "logs" / f"{lane_name(name)}.log"
    ident = B.provision_backend(spec, cache_root(), log, "auto", jobs=jobs)
    return HarnessBuild.load(Path(ident["harness_path"]).parent.parent / "harness.json")
