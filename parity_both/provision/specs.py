"""What a backend is: its spec (an engine kind + a source + a recipe), the built-in lanes, and the
keys its builds are cached under (computed without fetching anything).

Kinds: ``python`` (llama-cpp-python, in THIS project's environment), ``harness`` (our C++
harness compiled against a llama.cpp-family tree, see parity_both.provision.harness) and ``command``
(any program speaking the lane protocol, docs/lane-protocol.md: ``command`` argv, optional ``build``
argv lists, optional ``binary`` naming the file whose SHA-256 identifies the engine).
Sources: ``pypi`` (a requirement; for the harness kind: link the installed package's libraries with
the headers of the same version's sdist), ``sdist`` (the llama.cpp tree inside a PyPI source
distribution), ``local`` (a directory), ``git`` (a URL pinned to a commit, with submodules).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from parity_both.provision.build import ENGINE_BASE_CMAKE_ARGS, compiler_version
from parity_both.provision.failures import EXIT_SOURCE, BackendFailure


@dataclass(frozen=True)
class SourceSpec:
    type: str  # pypi | sdist | local | git | command
    requirement: str = ""  # pypi, sdist: "llama-cpp-python==0.3.1"
    subdir: str = ""  # the CMake project inside the source ("" = top level)
    path: str = ""  # local
    url: str = ""  # git
    commit: str = ""  # git: full 40-hex commit
    submodules: bool = True
    sha256: str = ""  # sdist: the archive's pinned sha256 (default: SDIST_SHA256, if it lists the requirement)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in ("", None)}


@dataclass(frozen=True)
class BackendSpec:
    name: str
    kind: str  # python | harness
    source: SourceSpec
    recipe: str = "llama.cpp"  # llama.cpp | bitnet
    cc: str | None = None
    cxx: str | None = None
    cmake_args: tuple[str, ...] = ()
    existing_dir_env: str | None = None  # env var naming an existing checkout/build (skips the fetch)
    existing_dir: str | None = None  # same, from config
    # kind: command (docs/lane-protocol.md)
    command: tuple[str, ...] = ()  # the program's argv before the subcommand
    build: tuple[tuple[str, ...], ...] = ()  # argv lists run (in build_cwd) when the binary is missing
    binary: str | None = None  # the file whose SHA-256 identifies the engine (default: command[0])
    build_cwd: str | None = None


BITNET_URL = "https://github.com/microsoft/BitNet"
BITNET_COMMIT = "16da220ae2b510caff437d403288882687f44ae5"

# sha256 of the source distributions the built-in lanes build from (as PyPI serves them); a fetched or
# local archive that differs is refused (parity_both.provision.fetch.verify_sdist).
SDIST_SHA256 = {
    "llama-cpp-python==0.3.1": "75ec8374960b6353c254e55a48e7c7783abf6bcb9178ba0f655490738e5a9004",
    "llama-cpp-python==0.3.36": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
}

BUILTIN_SPECS: dict[str, BackendSpec] = {
    "bitnet": BackendSpec(
        name="bitnet",
        kind="harness",
        recipe="bitnet",
        source=SourceSpec(type="git", url=BITNET_URL, commit=BITNET_COMMIT, submodules=True),
        cc="clang",
        cxx="clang++",
        cmake_args=("-DBITNET_X86_TL2=OFF", "-DBITNET_ARM_TL1=OFF"),
        existing_dir_env="BITNET_CPP_DIR",
    ),
    "llama": BackendSpec(
        name="llama", kind="python", source=SourceSpec(type="pypi", requirement="llama-cpp-python==0.3.36")
    ),
    "llama-2024": BackendSpec(
        name="llama-2024",
        kind="harness",
        source=SourceSpec(type="sdist", requirement="llama-cpp-python==0.3.1", subdir="vendor/llama.cpp"),
    ),
    # the harness against the SAME libraries the `llama` lane uses (0.3.36 headers from its sdist)
    "llama-harness": BackendSpec(
        name="llama-harness",
        kind="harness",
        source=SourceSpec(type="pypi", requirement="llama-cpp-python==0.3.36", subdir="vendor/llama.cpp"),
    ),
}


def spec_from_config(name: str, cfg: Mapping[str, Any] | None = None) -> BackendSpec:
    """A spec from a config mapping (kind, source: {type, requirement, url, commit, path, subdir,
    submodules}, recipe, cc, cxx, cmake_args, existing_dir); fields missing fall back to the built-in
    spec of the same name."""
    base = BUILTIN_SPECS.get(name)
    if cfg and cfg.get("kind") == "command":
        return command_spec(name, cfg)
    if not cfg:
        if base is None:
            raise BackendFailure(
                EXIT_SOURCE,
                "spec",
                f"unknown backend '{name}' (built-in: {', '.join(sorted(BUILTIN_SPECS))}) and no config for it",
            )
        return base
    src_cfg = dict(cfg.get("source") or {})
    if base is not None and not src_cfg:
        source = base.source
    else:
        source = SourceSpec(**{k: v for k, v in src_cfg.items() if k in SourceSpec.__dataclass_fields__})
    kind = str(cfg.get("kind", base.kind if base else ""))
    if kind not in ("python", "harness") or source.type not in ("pypi", "sdist", "local", "git"):
        raise BackendFailure(
            EXIT_SOURCE,
            "spec",
            f"backend '{name}': kind must be python|harness and "
            f"source.type pypi|sdist|local|git (got {kind!r}, {source.type!r})",
        )
    if kind == "python" and source.type != "pypi":
        raise BackendFailure(EXIT_SOURCE, "spec", f"backend '{name}': the python kind needs a pypi source")
    if source.type == "git" and not re.fullmatch(r"[0-9a-f]{40}", source.commit or ""):
        raise BackendFailure(
            EXIT_SOURCE, "spec", f"backend '{name}': a git source must be pinned to a full 40-hex commit"
        )
    return BackendSpec(
        name=name,
        kind=kind,
        source=source,
        recipe=str(cfg.get("recipe", base.recipe if base else "llama.cpp")),
        cc=cfg.get("cc", base.cc if base else None),
        cxx=cfg.get("cxx", base.cxx if base else None),
        cmake_args=tuple(cfg.get("cmake_args", base.cmake_args if base else ())),
        existing_dir_env=cfg.get("existing_dir_env", base.existing_dir_env if base else None),
        existing_dir=cfg.get("existing_dir"),
    )


def _argv(value: Any, what: str, name: str) -> tuple[str, ...]:
    if not (isinstance(value, (list, tuple)) and value and all(isinstance(a, (str, int, float)) for a in value)):
        raise BackendFailure(
            EXIT_SOURCE,
            "spec",
            f"backend '{name}': {what} must be a non-empty list of "
            f"arguments (an argv, never a shell string), not {value!r}",
        )
    return tuple(str(a) for a in value)


def command_spec(name: str, cfg: Mapping[str, Any]) -> BackendSpec:
    """``{kind: command, command: [program, args...], build: [[argv], ...], binary: path, build_cwd: dir}``."""
    unknown = sorted(set(cfg) - {"kind", "command", "build", "binary", "build_cwd"})
    if unknown:
        raise BackendFailure(
            EXIT_SOURCE,
            "spec",
            f"backend '{name}': unknown key(s) {', '.join(unknown)} for "
            "kind command (command, build, binary, build_cwd)",
        )
    command = _argv(cfg.get("command"), "command", name)
    build = tuple(_argv(step, "each build step", name) for step in (cfg.get("build") or ()))
    return BackendSpec(
        name=name,
        kind="command",
        source=SourceSpec(type="command"),
        recipe="command",
        command=command,
        build=build,
        binary=cfg.get("binary"),
        build_cwd=cfg.get("build_cwd"),
    )


def effective_spec(spec: BackendSpec, env: Mapping[str, str] | None = None) -> BackendSpec:
    """Apply an existing checkout (config existing_dir, or the spec's env var, e.g. BITNET_CPP_DIR):
    the source becomes that local directory and nothing is cloned."""
    env = os.environ if env is None else env
    existing = spec.existing_dir or (env.get(spec.existing_dir_env) if spec.existing_dir_env else None)
    if existing:
        return replace(
            spec,
            source=SourceSpec(type="local", path=str(Path(existing).resolve()), subdir=spec.source.subdir),
            existing_dir=str(existing),
        )
    return spec


def lane_spec(lane: str, config: Mapping[str, Any] | None = None) -> BackendSpec:
    """The spec of a lane: config ``backends: {lane: {...}}`` if present, else the built-in spec."""
    cfg = ((config or {}).get("backends") or {}).get(lane) if config else None
    return spec_from_config(lane, cfg)


def engine_name(spec: BackendSpec) -> str:
    if spec.kind == "command":
        return spec.name  # the program's info names it (probes.command_probe)
    return "bitnet.cpp" if spec.recipe == "bitnet" else "llama.cpp"


# ============================================================================================ keys


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:60]


def run_git(args: Sequence[str], cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true"}
    return subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


_TREE_EXTS = {
    ".c",
    ".cc",
    ".cpp",
    ".cxx",
    ".h",
    ".hpp",
    ".cu",
    ".cuh",
    ".m",
    ".metal",
    ".cmake",
    ".in",
    ".txt",
    ".comp",
    ".cl",
    ".inc",
    ".glsl",
    ".wgsl",
    ".s",
    ".S",
}
_TREE_SKIP = {".git", "build", "models", "docs", "examples", "tests", "gguf-py", "media", ".github", "ci"}


def tree_digest(root: Path) -> str:
    """Content hash of a source tree's build inputs (not .git, build dirs, models, docs)."""
    h = hashlib.sha256()
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _TREE_SKIP and not d.startswith("build"))
        for fn in sorted(filenames):
            p = Path(dirpath, fn)
            if p.suffix in _TREE_EXTS or fn == "CMakeLists.txt":
                with contextlib.suppress(OSError):
                    h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def local_revision(path: Path) -> str:
    """git:<HEAD>[+submodule heads] for a clean git checkout, else tree:<content hash>."""
    path = Path(path)
    if (path / ".git").exists():
        head = run_git(["rev-parse", "HEAD"], cwd=path)
        dirty = run_git(["status", "--porcelain", "--untracked-files=no", "--ignore-submodules=none"], cwd=path)
        if head.returncode == 0 and dirty.returncode == 0 and not dirty.stdout.strip():
            subs = run_git(["submodule", "status", "--recursive"], cwd=path)
            sub = ";".join(sorted(ln.strip().lstrip("+-U ") for ln in subs.stdout.splitlines()))
            return f"git:{head.stdout.strip()}" + (f"+{hashlib.sha256(sub.encode()).hexdigest()[:12]}" if sub else "")
    return f"tree:{tree_digest(path)}"


def pypi_name_version(requirement: str) -> tuple[str, str | None]:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*(?:==\s*([A-Za-z0-9_.+!-]+))?\s*", requirement)
    if not m:
        raise BackendFailure(EXIT_SOURCE, "spec", f"requirement {requirement!r}: use NAME==VERSION (pinned)")
    return m.group(1), m.group(2)


def source_identity(spec: BackendSpec) -> dict[str, Any]:
    """What the build is keyed by, computed WITHOUT fetching anything."""
    s = spec.source
    if s.type == "command":
        return {
            "type": "command",
            "command": list(spec.command),
            "binary": spec.binary,
            "build": [list(b) for b in spec.build],
        }
    if s.type == "git":
        return {
            "type": "git",
            "url": s.url,
            "commit": s.commit,
            "submodules": s.submodules,
            "subdir": s.subdir,
        }
    if s.type == "local":
        return {
            "type": "local",
            "path": str(Path(s.path).resolve()),
            "revision": local_revision(Path(s.path)),
            "subdir": s.subdir,
        }
    return {"type": s.type, "requirement": s.requirement, "subdir": s.subdir}


def build_key(spec: BackendSpec) -> str:
    inputs = {
        "recipe": spec.recipe,
        "source": source_identity(spec),
        "cmake_args": [*ENGINE_BASE_CMAKE_ARGS, *spec.cmake_args],
        "cc": spec.cc or "",
        "cxx": spec.cxx or "",
        "cc_version": compiler_version(spec.cc or "cc"),
        "cxx_version": compiler_version(spec.cxx or "c++"),
    }
    return f"{slug(spec.name)}-{digest(inputs)[:16]}"
