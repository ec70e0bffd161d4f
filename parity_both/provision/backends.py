"""Backends: a lane = an engine kind + a source, probed cheaply and provisioned on demand.

Kinds: ``python`` (llama-cpp-python, in THIS project's environment) and ``harness`` (our C++
harness compiled against a llama.cpp-family tree, see parity_both.provision.harness).
Sources: ``pypi`` (a requirement; for the harness kind: link the installed package's libraries with
the headers of the same version's sdist), ``sdist`` (the llama.cpp tree inside a PyPI source
distribution), ``local`` (a directory), ``git`` (a URL pinned to a commit, with submodules).

``probe_backend`` is cheap and deterministic (used at DAG-build time); ``provision_backend`` builds or
installs what is missing into a cache keyed by source + revision + flags + compiler, and returns the
backend's identity. Failures are classified from what happened (errno, exit status, phase) into
``BackendFailure`` codes:

    2 missing and repair disabled, or an unusable spec/source (unknown lane, pinned commit absent)
    3 source unreachable (after retries with backoff)   4 cache/build dir not writable
    5 configure/compile (or install-build) failure      6 recursion (PARITY_BOTH_REPAIRING already set)

Command line (for shell rules and the repair hint; exit status = failure code)::

    python -m parity_both.provision.backends probe NAME [--cache-dir D]
    python -m parity_both.provision.backends provision NAME [--cache-dir D] [--log L] [--out ID.json]
        [--repair auto|never|always] [--config BACKENDS.json]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from parity_both.config import ci_detected
from parity_both.hashing import cache_dir
from parity_both.provision.harness import (
    ENGINE_BASE_CMAKE_ARGS,
    HarnessBuild,
    HarnessBuildError,
    HarnessRunError,
    Progress,
    atomic_dir,
    build_harness,
    compiler_version,
    file_sha256,
    find_llama_tree,
    harness_source_digest,
    run_harness,
)
from parity_both.provision.lock import build_lock

ENV_CACHE = "PARITY_BOTH_CACHE"
ENV_REPAIR = "PARITY_BOTH_REPAIR"
ENV_GUARD = "PARITY_BOTH_REPAIRING"
ENV_SDIST_DIR = "PARITY_BOTH_SDIST_DIR"  # a directory that may already hold NAME-VERSION.tar.gz

EXIT_MISSING = 2
EXIT_NETWORK = 3
EXIT_PERMISSION = 4
EXIT_BUILD = 5
EXIT_RECURSION = 6
EXIT_SOURCE = 2  # "bad arguments or unusable input" in the pipeline's exit-code table
_KINDS = {
    EXIT_MISSING: "backend_missing",
    EXIT_NETWORK: "network",
    EXIT_PERMISSION: "permission",
    EXIT_BUILD: "build",
    EXIT_RECURSION: "recursion",
}

_NOT_WRITABLE_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.ENOSPC,
    errno.EDQUOT,
}
_NETWORK_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ENETUNREACH,
    errno.EHOSTUNREACH,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.EHOSTDOWN,
    errno.ENETDOWN,
    errno.ENOENT,
}


# ============================================================================================ errors


class BackendFailure(Exception):
    """A classified provisioning failure. ``code`` is the process exit status to use."""

    def __init__(
        self,
        code: int,
        phase: str,
        message: str,
        *,
        log_path: Path | str | None = None,
        hint: str = "",
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.phase = phase
        self.message = message
        self.log_path = str(log_path) if log_path else None
        self.hint = hint
        self.details = dict(details or {})

    @property
    def kind(self) -> str:
        return "bad_source" if self.phase in ("spec", "checkout") else _KINDS.get(self.code, "backend")

    @property
    def record(self) -> dict[str, Any]:
        """Extra fields for the pipeline's failure record (parity_both.jobs.run_job merges them)."""
        return {
            "phase": self.phase,
            "hint": self.hint,
            "build_log": self.log_path,
            "details": self.details,
            "backend_kind": self.kind,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "kind": self.kind,
            "phase": self.phase,
            "message": self.message,
            "log_path": self.log_path,
            "hint": self.hint,
            "details": self.details,
        }

    def __str__(self) -> str:
        out = f"[{self.code}] {self.phase}: {self.message}"
        if self.hint:
            out += f"\nhint: {self.hint}"
        if self.log_path:
            out += f"\nlog: {self.log_path}"
        return out


def failure_record_path(log_path: Path | str) -> Path:
    """Where the structured failure record goes: beside the backend target's log."""
    p = Path(log_path)
    return p.with_name(p.name + ".failure.json")


def write_failure_record(path: Path | str, failure: BackendFailure, backend: str | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"backend": backend, **failure.to_dict()}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


# ============================================================================================ specs


@dataclass(frozen=True)
class SourceSpec:
    type: str  # pypi | sdist | local | git
    requirement: str = ""  # pypi, sdist: "llama-cpp-python==0.3.1"
    subdir: str = ""  # the CMake project inside the source ("" = top level)
    path: str = ""  # local
    url: str = ""  # git
    commit: str = ""  # git: full 40-hex commit
    submodules: bool = True

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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["source"] = self.source.to_dict()
        d["cmake_args"] = list(self.cmake_args)
        return {k: v for k, v in d.items() if v not in (None, (), [])}


BITNET_URL = "https://github.com/microsoft/BitNet"
BITNET_COMMIT = "16da220ae2b510caff437d403288882687f44ae5"

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
    if not cfg:
        if base is None:
            raise BackendFailure(
                EXIT_SOURCE,
                "spec",
                f"unknown backend '{name}' (built-in: "
                f"{', '.join(sorted(BUILTIN_SPECS))}) and no config for it",
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


# ============================================================================================ repair

REPAIR_MODES = ("auto", "never", "always")


def _truthy(v: str | None) -> bool:
    return bool(v) and v.strip().lower() not in ("0", "false", "no", "off")


def resolve_repair_mode(requested: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """``auto`` (build/install what is missing), ``never``, or ``always`` (rebuild/reinstall even when
    present). Explicit request > $PARITY_BOTH_REPAIR > ``never`` when a CI variable is set > ``auto``."""
    env = os.environ if env is None else env
    if requested in REPAIR_MODES:
        return requested
    if requested not in (None, "", "default"):
        raise BackendFailure(
            EXIT_SOURCE,
            "spec",
            f"repair mode must be one of {', '.join(REPAIR_MODES)} or default, not {requested!r}",
        )
    forced = (env.get(ENV_REPAIR) or "").strip().lower()
    if forced in REPAIR_MODES:
        return forced
    if ci_detected(env):
        return "never"
    return "auto"


def default_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    return cache_dir(os.environ if env is None else env)


def repair_command(spec: BackendSpec, cache_dir: Path) -> str:
    cmd = (
        f"{ENV_REPAIR}=auto {shlex.quote(sys.executable)} -m parity_both.provision.backends provision "
        f"{shlex.quote(spec.name)} --cache-dir {shlex.quote(str(Path(cache_dir).resolve()))} --repair auto"
    )
    if spec.kind == "python" or spec.source.type == "pypi":
        cmd += f"   (or: {shlex.quote(sys.executable)} -m pip install {shlex.quote(spec.source.requirement)})"
    return cmd


# ============================================================================================ keys


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:60]


def _git(
    args: Sequence[str], cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
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
        head = _git(["rev-parse", "HEAD"], cwd=path)
        dirty = _git(["status", "--porcelain", "--untracked-files=no", "--ignore-submodules=none"], cwd=path)
        if head.returncode == 0 and dirty.returncode == 0 and not dirty.stdout.strip():
            subs = _git(["submodule", "status", "--recursive"], cwd=path)
            sub = ";".join(sorted(ln.strip().lstrip("+-U ") for ln in subs.stdout.splitlines()))
            return f"git:{head.stdout.strip()}" + (
                f"+{hashlib.sha256(sub.encode()).hexdigest()[:12]}" if sub else ""
            )
    return f"tree:{tree_digest(path)}"


def _pypi_name_version(requirement: str) -> tuple[str, str | None]:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*(?:==\s*([A-Za-z0-9_.+!-]+))?\s*", requirement)
    if not m:
        raise BackendFailure(EXIT_SOURCE, "spec", f"requirement {requirement!r}: use NAME==VERSION (pinned)")
    return m.group(1), m.group(2)


def source_identity(spec: BackendSpec) -> dict[str, Any]:
    """What the build is keyed by, computed WITHOUT fetching anything."""
    s = spec.source
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
    return f"{_slug(spec.name)}-{_digest(inputs)[:16]}"


# ============================================================================================ probe


def _python_probe(requirement: str) -> dict[str, Any]:
    """llama-cpp-python in THIS environment, by looking at files (cheap, no import): version,
    library directory, sha256 of libllama.so. Loading is proven by provision_backend (a subprocess)."""
    import importlib.metadata
    import importlib.util

    _, want = _pypi_name_version(requirement)
    try:
        found = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        found = None
    if found is None or found.origin is None:
        return {"present": False, "problem": "llama_cpp is not installed in this environment"}
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        version = None
    lib_dir = Path(found.origin).parent / "lib"
    lib = lib_dir / "libllama.so"
    out: dict[str, Any] = {"present": True, "version": version, "lib_dir": str(lib_dir)}
    if not lib.is_file():
        out.update(present=False, problem=f"{lib} is missing")
        return out
    out["libllama_sha256"] = file_sha256(lib)
    if want and version != want:
        out.update(present=False, problem=f"installed llama-cpp-python {version} != pinned {want}")
    return out


def _python_load_check(log_path: Path) -> dict[str, Any]:
    """Import llama_cpp in a fresh interpreter: proves the library loads; returns its system info."""
    code = (
        "import json, llama_cpp; print(json.dumps({'system_info': "
        "llama_cpp.llama_print_system_info().decode(), 'module': llama_cpp.__file__}))"
    )
    proc = _run_to_log([sys.executable, "-c", code], log_path, timeout=300)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["import failed"])[-1]
        raise BackendFailure(
            EXIT_BUILD,
            "verify",
            f"llama_cpp does not load: {last}",
            log_path=log_path,
            details={"returncode": proc.returncode},
        )
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def engine_name(spec: BackendSpec) -> str:
    return "bitnet.cpp" if spec.recipe == "bitnet" else "llama.cpp"


def _harness_dirs(spec: BackendSpec, cache_dir: Path, linked: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """(root of this backend's builds, harness dir for the current harness sources). A harness linked
    to an installed package is keyed by that package's library bytes AND directory: its run path
    points there, so another environment (another clone's venv) must not reuse it."""
    digest = harness_source_digest()[:16]
    if spec.source.type == "pypi":
        lk = linked or {}
        key = _digest([spec.source.to_dict(), lk.get("libllama_sha256"), lk.get("lib_dir")])[:16]
        root = cache_dir / "links" / f"{_slug(spec.name)}-{key}"
    else:
        root = cache_dir / "builds" / build_key(spec)
    return root, root / f"harness-{digest}"


def probe_backend(spec: BackendSpec, cache_dir: Path | str | None = None) -> dict[str, Any]:
    """Cheap, deterministic: is the backend there, does it load, which version/revision. No fetch,
    no build, no timestamps. For the harness kind, ``parity_harness info`` is run (it loads the
    engine's libraries and reports what it loaded)."""
    spec = effective_spec(spec)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    out: dict[str, Any] = {
        "name": spec.name,
        "kind": spec.kind,
        "recipe": spec.recipe,
        "source": source_identity(spec),
    }
    try:
        out["engine"] = engine_name(spec)
        if spec.kind == "python":
            out.update(_python_probe(spec.source.requirement))
            return out
        linked_pkg = None
        if spec.source.type == "pypi":
            py = _python_probe(spec.source.requirement)
            linked_pkg = py
            out["linked_package"] = {k: py.get(k) for k in ("version", "lib_dir", "libllama_sha256")}
            if not py.get("present"):
                out.update(present=False, problem=py.get("problem", "package missing"))
                return out
        root, hdir = _harness_dirs(spec, cache_dir, linked_pkg)
        out["key"] = root.name
        out["harness_dir"] = str(hdir)
        hjson = hdir / "harness.json"
        if not hjson.is_file():
            out.update(present=False, problem=f"no harness build at {hdir}")
            return out
        build = HarnessBuild.load(hjson)
        info = run_harness(build.harness_path, ["info"], timeout=60)
        libs = sorted(os.path.normpath(p) for p in info.get("libraries", []))
        llama_lib = next((p for p in libs if Path(p).name.startswith("libllama")), None)
        out.update(
            present=True,
            harness_path=build.harness_path,
            api_generation=info["api_generation"],
            api_features=info["api_features"],
            libraries=libs,
            system_info=info.get("system_info"),
            libllama_sha256=file_sha256(Path(llama_lib)) if llama_lib else None,
        )
        if linked_pkg is not None and (
            linked_pkg.get("libllama_sha256") != out["libllama_sha256"]
            or (llama_lib and os.path.realpath(Path(llama_lib).parent)
                != os.path.realpath(str(linked_pkg.get("lib_dir"))))
        ):
            out.update(
                present=False, problem="the harness does not load the installed llama-cpp-python library"
            )
        return out
    except (
        HarnessRunError,
        HarnessBuildError,
        OSError,
        ValueError,
        KeyError,
        subprocess.TimeoutExpired,
    ) as exc:
        out.update(present=False, problem=f"{type(exc).__name__}: {exc}")
        return out


# ============================================================================================ fetch


def _check_writable(path: Path, log_path: Path | None) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise BackendFailure(
            EXIT_PERMISSION,
            "prepare",
            f"cannot write to {path}: "
            f"{exc.strerror or exc} (errno {errno.errorcode.get(exc.errno or 0, exc.errno)})",
            log_path=log_path,
            hint=f"make {path} writable, or point {ENV_CACHE} / --cache-dir at a writable directory",
            details={"errno": exc.errno, "path": str(path)},
        ) from exc


def _endpoint_error(url: str, timeout: float = 5.0) -> OSError | None:
    """Try to reach the source: a TCP connect for network URLs, a stat for local ones.
    Returns the OSError (with its errno) or None when reachable."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("", "file"):
        local = parsed.path if parsed.scheme == "file" else url
        try:
            os.stat(local)
            return None
        except OSError as exc:
            return exc
    host = parsed.hostname or ""
    port = parsed.port or {"https": 443, "http": 80, "ssh": 22, "git": 9418}.get(parsed.scheme, 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.gaierror as exc:
        return OSError(errno.EHOSTUNREACH, f"cannot resolve {host}: {exc}")
    except OSError as exc:
        return exc


def _proxied(url: str) -> bool:
    scheme = urllib.parse.urlparse(url).scheme
    names = {"http": ("http_proxy",), "https": ("https_proxy",)}.get(scheme, ()) + ("all_proxy",)
    return any(os.environ.get(n) or os.environ.get(n.upper()) for n in names)


def _with_retries(
    what: str,
    attempt_fn: Callable[[], None],
    *,
    retries: int,
    backoff: float,
    log_path: Path,
    progress: Progress,
) -> None:
    """Run attempt_fn; on _Transient retry with exponential backoff; then raise BackendFailure(3)."""
    last: _Transient | None = None
    for attempt in range(1, retries + 1):
        try:
            attempt_fn()
            return
        except _Transient as exc:
            last = exc
            _append(log_path, f"[attempt {attempt}/{retries}] {what}: {exc}\n")
            if attempt < retries:
                delay = backoff * 2 ** (attempt - 1)
                progress("retry", f"{what} failed ({exc}); retrying in {delay:.2f}s")
                time.sleep(delay)
    assert last is not None
    raise BackendFailure(
        EXIT_NETWORK,
        "fetch",
        f"{what}: source unreachable after {retries} attempts: {last}",
        log_path=log_path,
        hint="check the network / proxy and the source URL, then rerun",
        details={"errno": last.errno, "attempts": retries, "returncode": last.returncode},
    )


class _Transient(Exception):
    def __init__(self, message: str, errno_: int | None = None, returncode: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_
        self.returncode = returncode


def _append(log_path: Path, text: str) -> None:
    with open(log_path, "a", encoding="utf-8", errors="replace") as fh:
        fh.write(text)


def _run_to_log(
    cmd: Sequence[str],
    log_path: Path,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 3600,
) -> subprocess.CompletedProcess[str]:
    _append(log_path, f"\n$ {' '.join(shlex.quote(str(c)) for c in cmd)}\n")
    proc = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=dict(env) if env else None,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    _append(log_path, proc.stdout + proc.stderr + f"[exit status {proc.returncode}]\n")
    return proc


def _is_local_url(url: str) -> bool:
    return urllib.parse.urlparse(url).scheme in ("", "file")


def fetch_git(
    spec: BackendSpec, dest: Path, log_path: Path, *, retries: int, backoff: float, progress: Progress
) -> None:
    """Clone url into dest (a fresh temporary dir), check out the pinned commit, init submodules."""
    s = spec.source
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true"}
    # Local "upstreams" (file:// or a path) are allowed to use local submodules too; git blocks the
    # file transport for submodules by default since 2.38.1 (CVE-2022-39253).
    cfg = ["-c", "protocol.file.allow=always"] if _is_local_url(s.url) else []

    def clone() -> None:
        shutil.rmtree(dest, ignore_errors=True)
        proc = _run_to_log(["git", *cfg, "clone", "--no-checkout", s.url, dest], log_path, env=env)
        if proc.returncode != 0:
            _check_writable(dest.parent, log_path)  # a local write failure is not a network problem
            # git decides reachability (it knows proxies and credentials); a direct connect/stat then
            # says how the endpoint fails (errno), for the record
            err = _endpoint_error(s.url) if not _proxied(s.url) else None
            last = (proc.stderr.strip().splitlines() or [""])[-1]
            raise _Transient(
                f"git clone exited {proc.returncode}: {last}"
                + (f" [{s.url}: {err.strerror or err}, errno {err.errno}]" if err is not None else ""),
                errno_=err.errno if err is not None else None,
                returncode=proc.returncode,
            )

    progress("fetch", f"git clone {s.url}")
    _with_retries(
        f"git clone {s.url}", clone, retries=retries, backoff=backoff, log_path=log_path, progress=progress
    )
    proc = _run_to_log(["git", "-C", dest, "checkout", "--detach", s.commit], log_path, env=env)
    if proc.returncode != 0:
        fetched = _run_to_log(["git", "-C", dest, "fetch", "origin", s.commit], log_path, env=env)
        proc = _run_to_log(["git", "-C", dest, "checkout", "--detach", s.commit], log_path, env=env)
        if fetched.returncode != 0 or proc.returncode != 0:
            raise BackendFailure(
                EXIT_SOURCE,
                "checkout",
                f"pinned commit {s.commit} is not in {s.url}",
                log_path=log_path,
                hint="fix the pinned commit in the backend spec",
            )
    if s.submodules:

        def submodules() -> None:
            p = _run_to_log(
                ["git", *cfg, "-C", dest, "submodule", "update", "--init", "--recursive"], log_path, env=env
            )
            if p.returncode != 0:
                raise _Transient(
                    f"git submodule update exited {p.returncode}: "
                    f"{(p.stderr.strip().splitlines() or [''])[-1]}",
                    returncode=p.returncode,
                )

        progress("fetch", "git submodule update --init --recursive")
        _with_retries(
            "git submodule update",
            submodules,
            retries=retries,
            backoff=backoff,
            log_path=log_path,
            progress=progress,
        )
    head = _git(["rev-parse", "HEAD"], cwd=dest).stdout.strip()
    if head != s.commit:
        raise BackendFailure(
            EXIT_SOURCE, "checkout", f"HEAD is {head}, expected {s.commit}", log_path=log_path
        )


_PIP_NETWORK = re.compile(
    r"NewConnectionError|Max retries exceeded|Temporary failure in name resolution|"
    r"Network is unreachable|Connection refused|ConnectTimeoutError|ReadTimeoutError|"
    r"ProxyError|SSLError"
)


def _index_endpoint() -> str:
    return os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple/"


def _pip(
    args: Sequence[str],
    what: str,
    log_path: Path,
    *,
    retries: int,
    backoff: float,
    progress: Progress,
    phase: str,
) -> None:
    """Run pip; classify: unreachable index -> 3 (after retries), permission -> 4, wheel build -> 5,
    no such version -> 7."""
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    if any("llama-cpp-python" in a or "llama_cpp_python" in a for a in args) and "CMAKE_ARGS" not in env:
        # llama-cpp-python compiles llama.cpp: build it like the Makefile does (portable AVX2, no AMX:
        # -march=native crashes in ggml's AMX kernels where the CPU advertises AMX without granting it)
        env["CMAKE_ARGS"] = " ".join(a for a in ENGINE_BASE_CMAKE_ARGS if a.startswith("-DGGML_") and
                                     a != "-DGGML_OPENMP=OFF")
        env.setdefault("PIP_NO_CACHE_DIR", "1")  # never reuse a wheel pip cached with other flags

    def attempt() -> None:
        proc = _run_to_log(
            [sys.executable, "-m", "pip", *args, "--retries", "2", "--timeout", "30"], log_path, env=env
        )
        if proc.returncode == 0:
            return
        text = proc.stdout + proc.stderr
        if "Permission denied" in text or "[Errno 13]" in text or "[Errno 30]" in text:
            raise BackendFailure(
                EXIT_PERMISSION,
                phase,
                f"{what}: permission denied (see log)",
                log_path=log_path,
                hint="the Python environment or target directory is not writable",
                details={"returncode": proc.returncode},
            )
        if re.search(r"Failed building wheel|Failed to build|subprocess-exited-with-error", text):
            raise BackendFailure(
                EXIT_BUILD,
                phase,
                f"{what}: building the package failed (see log)",
                log_path=log_path,
                details={"returncode": proc.returncode},
            )
        idx_err = None if _proxied(_index_endpoint()) else _endpoint_error(_index_endpoint())
        if idx_err is not None or _PIP_NETWORK.search(text):
            raise _Transient(
                f"{what}: index unreachable ({idx_err or 'network error in pip output'})",
                errno_=getattr(idx_err, "errno", None),
                returncode=proc.returncode,
            )
        if "No matching distribution" in text or "Could not find a version" in text:
            raise BackendFailure(
                EXIT_SOURCE,
                phase,
                f"{what}: no such distribution",
                log_path=log_path,
                details={"returncode": proc.returncode},
            )
        raise BackendFailure(
            EXIT_BUILD,
            phase,
            f"{what} failed (exit status {proc.returncode})",
            log_path=log_path,
            details={"returncode": proc.returncode},
        )

    progress(phase, what)
    _with_retries(what, attempt, retries=retries, backoff=backoff, log_path=log_path, progress=progress)


def fetch_sdist(
    requirement: str, dest: Path, log_path: Path, *, retries: int, backoff: float, progress: Progress
) -> dict[str, str]:
    """pip download the sdist into a temp dir, extract it to dest (fresh dir). Returns file + sha256."""
    name, version = _pypi_name_version(requirement)
    with tempfile.TemporaryDirectory(prefix="sdist-", dir=dest.parent) as dl:
        local = [
            Path(d) / f"{n}-{version}.tar.gz"
            for d in os.environ.get(ENV_SDIST_DIR, "").split(os.pathsep)
            if d
            for n in {name, name.replace("-", "_")}
        ]
        files = [p for p in local if p.is_file()][:1]
        if files:
            progress("fetch", f"using {files[0]} (${ENV_SDIST_DIR})")
            _append(log_path, f"[sdist] using {files[0]} from ${ENV_SDIST_DIR}\n")
        else:
            args = [
                "download",
                "--no-binary",
                ":all:",
                "--no-deps",
                requirement,
                "-d",
                dl,
            ]
            _pip(
                args,
                f"pip download {requirement}",
                log_path,
                retries=retries,
                backoff=backoff,
                progress=progress,
                phase="fetch",
            )
            files = sorted(Path(dl).glob("*.tar.gz"))
        if not files:
            raise BackendFailure(
                EXIT_SOURCE, "fetch", f"pip download {requirement} produced no .tar.gz", log_path=log_path
            )
        sha = file_sha256(files[0])
        progress("extract", files[0].name)
        with tarfile.open(files[0]) as tf:
            tf.extractall(dest, filter="data")
    return {"sdist": files[0].name, "sdist_sha256": sha}


# ============================================================================================ recipes

_EMPTY_LUT_HEADER = """// Written by parity-both: an I2_S-only build (BITNET_X86_TL2=OFF / BITNET_ARM_TL1=OFF)
// needs this header to exist; every use of its contents is guarded by GGML_BITNET_X86_TL2 / _ARM_TL1.
#pragma once
"""


def prepare_bitnet_tree(root: Path, log_path: Path) -> str:
    """BitNet.cpp's CMake needs include/bitnet-lut-kernels.h even for I2_S-only builds. Copy a
    preset one (what BitNet's setup_env.py does) or write an empty guarded one. Returns what was done."""
    target = root / "include" / "bitnet-lut-kernels.h"
    if target.exists():
        return "present"
    presets = (
        sorted((root / "preset_kernels").glob("*/bitnet-lut-kernels-tl2.h"))
        if (root / "preset_kernels").is_dir()
        else []
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    if presets:
        shutil.copy2(presets[0], target)
        what = f"copied {presets[0].relative_to(root)}"
    else:
        target.write_text(_EMPTY_LUT_HEADER)
        what = "wrote an empty guarded header"
    _append(log_path, f"[bitnet] include/bitnet-lut-kernels.h: {what}\n")
    return what


def _existing_build(root: Path) -> tuple[Path, list[Path]] | None:
    """An existing build inside a checkout: (libllama dir, include dirs) if one is there."""
    for lib in sorted(root.glob("build/**/libllama.so")):
        tree = find_llama_tree(root)
        return lib.parent, [tree / "include", tree / "ggml" / "include"]
    return None


# ============================================================================================ provision


@contextlib.contextmanager
def _repair_guard(name: str) -> Iterator[None]:
    old = os.environ.get(ENV_GUARD)
    os.environ[ENV_GUARD] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV_GUARD, None)
        else:
            os.environ[ENV_GUARD] = old


def _identity(spec: BackendSpec, probe: dict[str, Any], cache_dir: Path) -> dict[str, Any]:
    """The backend's identity (deterministic: no timings, no timestamps)."""
    ident: dict[str, Any] = {
        "name": spec.name,
        "engine": probe.get("engine"),
        "kind": spec.kind,
        "recipe": spec.recipe,
        "source": probe.get("source"),
    }
    if spec.kind == "python":
        ident.update(
            package="llama-cpp-python",
            version=probe.get("version"),
            requirement=spec.source.requirement,
            revision=f"llama-cpp-python=={probe.get('version')}",
            api_generation="2025+",
            library_paths=[probe.get("lib_dir")],
            libllama_sha256=probe.get("libllama_sha256"),
        )
        return ident
    linked = probe.get("linked_package") or {}
    _, hdir = _harness_dirs(spec, cache_dir, linked)
    build = HarnessBuild.load(hdir / "harness.json")
    eng = build.engine
    src = probe.get("source") or {}
    ident.update(
        revision=src.get("commit") or src.get("revision") or spec.source.requirement,
        api_generation=build.api_generation,
        api_features=build.api_features,
        harness_path=build.harness_path,
        harness_digest=build.harness_digest,
        library_paths=probe.get("libraries"),
        libllama_sha256=probe.get("libllama_sha256"),
        system_info=probe.get("system_info"),
        compiler={"harness": build.compiler, "engine": eng.get("compiler")},
        build_flags={
            "engine_cmake_args": eng.get("cmake_args"),
            "engine_flags": eng.get("flags"),
            "harness_cmake_args": build.harness_cmake_args,
        },
        cache_path=str(hdir.parent),
        key=probe.get("key"),
    )
    for k in ("sdist", "sdist_sha256", "bitnet_lut_header", "git_url", "git_commit", "existing_build"):
        if k in eng:
            ident[k] = eng[k]
    if linked:
        ident["linked_package"] = linked
    return ident


def build_log_path(log_path: Path | str) -> Path:
    """Where the full fetch/configure/compiler output goes: beside the rule's log, as *.build.log
    (a separate file: the rule's own log is opened for writing by the job wrapper)."""
    p = Path(log_path)
    stem = p.name[:-4] if p.name.endswith(".log") else p.name
    return p.with_name(stem + ".build.log")


def provision_backend(
    spec: BackendSpec,
    cache_dir: Path | str | None,
    log_path: Path | str,
    repair: str | None = "default",
    *,
    retries: int = 3,
    backoff: float = 2.0,
    jobs: int = 2,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Make the backend usable (build/install if missing and repair allows) and return its identity.

    log_path receives the full build output (pass the rule's build log, see build_log_path).
    Progress lines go to stderr. Raises BackendFailure (see the module docstring for codes); on
    failure nothing partial is left in the cache (builds happen in temporary dirs renamed at the end).
    """
    spec = effective_spec(spec)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    log_path = Path(log_path)
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a"):
            pass
    except OSError as exc:
        raise BackendFailure(
            EXIT_PERMISSION,
            "prepare",
            f"cannot write the log {log_path}: {exc.strerror or exc}",
            details={"errno": exc.errno, "path": str(log_path)},
        ) from exc
    progress = progress or Progress(f"backend {spec.name}")
    mode = resolve_repair_mode(repair)
    probe = probe_backend(spec, cache_dir)
    if probe.get("present") and mode != "always":
        progress("present", probe.get("key") or probe.get("version") or "")
        ident = _identity(spec, probe, cache_dir)
        if spec.kind == "python":
            ident["system_info"] = _python_load_check(log_path)["system_info"]
        return ident
    problem = (
        probe.get("problem", "missing") if not probe.get("present") else "rebuild requested (repair=always)"
    )
    if mode == "never":
        ci_var = ci_detected()
        by_ci = ci_var and repair in (None, "", "default")
        why = f" (CI environment detected: {ci_var} is set)" if by_ci else ""
        raise BackendFailure(
            EXIT_MISSING,
            "probe",
            f"backend '{spec.name}' is not usable ({problem}) and repair is disabled{why}",
            log_path=log_path,
            hint=f"to repair it run: {repair_command(spec, cache_dir)}",
            details={"problem": problem},
        )
    if os.environ.get(ENV_GUARD):
        raise BackendFailure(
            EXIT_RECURSION,
            "guard",
            f"backend '{spec.name}' needs a repair, but a repair is "
            f"already running ({ENV_GUARD}={os.environ[ENV_GUARD]}): refusing to recurse",
            log_path=log_path,
            hint=f"unset {ENV_GUARD} if no provisioning is running",
        )
    progress("repair", problem)
    # Concurrent jobs (or cluster nodes sharing the cache) never build the same backend twice: the first
    # takes the lock and builds, the others wait and then find it present.
    with build_lock(cache_dir, f"backend-{spec.name}-{probe.get('key') or 'pypi'}"):
        probe = probe_backend(spec, cache_dir)
        if probe.get("present") and mode != "always":
            progress("present", "built by a concurrent job")
            ident = _identity(spec, probe, cache_dir)
            if spec.kind == "python":
                ident["system_info"] = _python_load_check(log_path)["system_info"]
            return ident
        _repair_locked(spec, cache_dir, log_path, mode, retries=retries, backoff=backoff, jobs=jobs,
                       progress=progress)
    probe = probe_backend(spec, cache_dir)
    if not probe.get("present"):
        raise BackendFailure(
            EXIT_BUILD,
            "verify",
            f"provisioned, but still not usable: {probe.get('problem')}",
            log_path=log_path,
        )
    ident = _identity(spec, probe, cache_dir)
    if spec.kind == "python":
        ident["system_info"] = _python_load_check(log_path)["system_info"]
    progress("ready", probe.get("key") or probe.get("version") or "")
    return ident


def _repair_locked(spec: BackendSpec, cache_dir: Path, log_path: Path, mode: str, *, retries: int, backoff: float,
                   jobs: int, progress: Progress) -> None:
    """The repair itself (called holding the backend's build lock)."""
    with _repair_guard(spec.name):
        try:
            _repair(
                spec,
                cache_dir,
                log_path,
                force=mode == "always",
                retries=retries,
                backoff=backoff,
                jobs=jobs,
                progress=progress,
            )
        except HarnessBuildError as exc:
            raise _classify_build_error(exc, log_path) from exc
        except OSError as exc:
            if exc.errno in _NOT_WRITABLE_ERRNOS:
                raise BackendFailure(
                    EXIT_PERMISSION,
                    "prepare",
                    f"{exc.strerror or exc}: {exc.filename}",
                    log_path=log_path,
                    details={"errno": exc.errno},
                ) from exc
            raise


def _classify_build_error(exc: HarnessBuildError, log_path: Path) -> BackendFailure:
    if exc.errno in _NOT_WRITABLE_ERRNOS:
        return BackendFailure(
            EXIT_PERMISSION,
            exc.phase,
            exc.message,
            log_path=exc.log_path or log_path,
            hint=f"make the cache writable or set {ENV_CACHE}",
            details={"errno": exc.errno},
        )
    hint = "see the log for the first compiler error"
    if exc.errno == errno.ENOENT and exc.cmd:
        hint = f"install {exc.cmd[0]}"
    return BackendFailure(
        EXIT_BUILD,
        exc.phase,
        exc.message,
        log_path=exc.log_path or log_path,
        hint=hint,
        details={"returncode": exc.returncode, "errno": exc.errno, "command": [str(c) for c in exc.cmd]},
    )


def _repair(
    spec: BackendSpec,
    cache_dir: Path,
    log_path: Path,
    *,
    force: bool,
    retries: int,
    backoff: float,
    jobs: int,
    progress: Progress,
) -> None:
    _check_writable(cache_dir, log_path)
    s = spec.source
    if s.type == "pypi":
        py = _python_probe(s.requirement)
        if not py.get("present") or (force and spec.kind == "python"):
            extra = ["--force-reinstall", "--no-deps"] if force and py.get("present") else []
            _pip(
                ["install", *extra, s.requirement],
                f"pip install {s.requirement}",
                log_path,
                retries=retries,
                backoff=backoff,
                progress=progress,
                phase="install",
            )
            py = _python_probe(s.requirement)
            if not py.get("present"):
                raise BackendFailure(
                    EXIT_BUILD,
                    "install",
                    f"installed, but not usable: {py.get('problem')}",
                    log_path=log_path,
                )
        if spec.kind == "python":
            return
        # the harness linked to the installed libraries, with the same version's sdist headers
        src = _ensure_source(
            replace(spec, source=replace(s, type="sdist")),
            cache_dir,
            log_path,
            retries=retries,
            backoff=backoff,
            progress=progress,
        )
        tree = find_llama_tree(src)
        root, hdir = _harness_dirs(spec, cache_dir, py)
        if force:
            shutil.rmtree(hdir, ignore_errors=True)
        build_harness(
            root,
            log_path,
            lib_dir=Path(py["lib_dir"]),
            include_dirs=[tree / "include", tree / "ggml" / "include"],
            cxx=spec.cxx,
            jobs=jobs,
            progress=progress,
        )
        _merge_engine_record(
            root,
            {
                "linked_package": {
                    "requirement": s.requirement,
                    "version": py.get("version"),
                    "lib_dir": py.get("lib_dir"),
                }
            },
        )
        return
    src = _ensure_source(spec, cache_dir, log_path, retries=retries, backoff=backoff, progress=progress)
    root, hdir = _harness_dirs(spec, cache_dir)
    if force:
        shutil.rmtree(root, ignore_errors=True)
    if spec.existing_dir:
        existing = _existing_build(src)
        if existing is not None:
            lib_dir, inc = existing
            progress("existing build", str(lib_dir))
            build_harness(
                root, log_path, lib_dir=lib_dir, include_dirs=inc, cxx=spec.cxx, jobs=jobs, progress=progress
            )
            _merge_engine_record(root, {"existing_build": str(lib_dir)})
            return
    for tool in (spec.cc, spec.cxx):
        if tool and not shutil.which(tool):
            raise BackendFailure(
                EXIT_BUILD,
                "configure",
                f"compiler {tool} not found (the {spec.recipe} recipe needs it"
                + (": BitNet.cpp's CMake refuses anything but clang)" if spec.recipe == "bitnet" else ")"),
                log_path=log_path,
                hint="apt-get install -y clang" if "clang" in tool else f"install {tool}",
                details={"errno": errno.ENOENT, "command": [tool]},
            )
    project = src / s.subdir if s.subdir and s.type == "local" else src
    lut_note = prepare_bitnet_tree(project, log_path) if spec.recipe == "bitnet" else None
    build_harness(
        root,
        log_path,
        engine_src=project,
        cc=spec.cc,
        cxx=spec.cxx,
        extra_cmake_args=spec.cmake_args,
        jobs=jobs,
        progress=progress,
    )
    extra: dict[str, Any] = {}
    if lut_note:
        extra["bitnet_lut_header"] = lut_note
    for meta in (project / ".parity-both-source.json", src / ".parity-both-source.json"):
        if meta.is_file():
            extra.update(json.loads(meta.read_text()))
    if extra:
        _merge_engine_record(root, extra)


def _merge_engine_record(root: Path, extra: dict[str, Any]) -> None:
    """Add source facts to engine.json and every harness.json below root (atomically per file)."""
    for path in [root / "engine.json", *root.glob("harness-*/harness.json")]:
        if not path.is_file():
            continue
        rec = json.loads(path.read_text())
        target = rec if path.name == "engine.json" else rec.setdefault("engine", {})
        if all(target.get(k) == v for k, v in extra.items()):
            continue
        target.update(extra)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(rec, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)


def _ensure_source(
    spec: BackendSpec, cache_dir: Path, log_path: Path, *, retries: int, backoff: float, progress: Progress
) -> Path:
    """The source tree to build (fetched into cache_dir/sources atomically when needed)."""
    s = spec.source
    if s.type == "local":
        path = Path(s.path)
        if not path.is_dir():
            raise BackendFailure(
                EXIT_SOURCE, "fetch", f"local source {path} is not a directory", log_path=log_path
            )
        return path
    sources = cache_dir / "sources"
    _check_writable(sources, log_path)
    if s.type == "git":
        final = (
            sources / f"git-{_slug(Path(urllib.parse.urlparse(s.url).path).name)}-{s.commit[:12]}-"
            f"{_digest([s.url, s.commit, s.submodules])[:8]}"
        )
        if not final.is_dir():
            with atomic_dir(final) as tmp:
                fetch_git(spec, tmp / "repo", log_path, retries=retries, backoff=backoff, progress=progress)
                (tmp / "repo" / ".parity-both-source.json").write_text(
                    json.dumps({"git_url": s.url, "git_commit": s.commit}, sort_keys=True) + "\n"
                )
        root = final / "repo"
        return root / s.subdir if s.subdir else root
    if s.type == "sdist":
        name, version = _pypi_name_version(s.requirement)
        if not version:
            raise BackendFailure(EXIT_SOURCE, "spec", f"sdist source {s.requirement!r} must be pinned (==)")
        final = sources / f"sdist-{_slug(name)}-{_slug(version)}"
        if not final.is_dir():
            with atomic_dir(final) as tmp:
                meta = fetch_sdist(
                    s.requirement, tmp, log_path, retries=retries, backoff=backoff, progress=progress
                )
                tops = [p for p in tmp.iterdir() if p.is_dir()]
                if len(tops) != 1:
                    raise BackendFailure(
                        EXIT_SOURCE, "fetch", f"unexpected sdist layout: {tops}", log_path=log_path
                    )
                tops[0].rename(tmp / "src")
                (tmp / "src" / ".parity-both-source.json").write_text(json.dumps(meta, sort_keys=True) + "\n")
        root = final / "src"
        tree = root / s.subdir if s.subdir else root
        if not (tree / "CMakeLists.txt").is_file():
            raise BackendFailure(
                EXIT_SOURCE,
                "fetch",
                f"{s.requirement}: no CMake project at {s.subdir or '.'}",
                log_path=log_path,
            )
        if tree != root and not (tree / ".parity-both-source.json").exists():
            shutil.copy2(root / ".parity-both-source.json", tree / ".parity-both-source.json")
        return tree
    raise BackendFailure(EXIT_SOURCE, "spec", f"cannot build from a {s.type} source")


# ============================================================================================ lanes


def lane_spec(lane: str, config: Mapping[str, Any] | None = None) -> BackendSpec:
    """The spec of a lane: config ``backends: {lane: {...}}`` if present, else the built-in spec."""
    cfg = ((config or {}).get("backends") or {}).get(lane) if config else None
    return spec_from_config(lane, cfg)


def probe_lane(
    lane: str, cache_dir: Path | str | None = None, config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The DAG-time probe (deterministic JSON-able dict; changes when the backend vanishes/changes)."""
    try:
        return probe_backend(lane_spec(lane, config), cache_dir)
    except BackendFailure as f:
        return {"name": lane, "present": False, "problem": f.message}


# Fields of a probe that depend on whether the build is there right now (not on WHICH build it is).
_STATE_FIELDS = ("present", "problem", "libraries", "api_generation", "api_features", "system_info",
                 "harness_path")


def stable_probe(probe: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a probe that names WHICH backend is expected (spec, source revision, cache key,
    harness sources digest, and for linked/python backends the installed library's sha256) and is
    identical before and after a successful repair. Use it as the backend rule's param, and trigger
    the repair of a missing backend separately (e.g. remove the rule's output when
    ``probe["present"]`` is false): a param that embeds ``present`` changes again after the repair,
    and Snakemake then reruns the backend rule AND everything downstream one more time."""
    out = {k: v for k, v in probe.items() if k not in _STATE_FIELDS}
    if probe.get("kind") == "harness" and "linked_package" not in probe:
        out.pop("libllama_sha256", None)  # built by us: determined by the key
    return out


def provision_lane(
    lane: str,
    probe: Mapping[str, Any] | None = None,
    *,
    repair: str | None = "default",
    repair_why: str = "",
    log_path: Path | str,
    threads: int = 2,
    cache_dir: Path | str | None = None,
    config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The backend rule's body: provision (if needed and allowed) and return the backend record the
    lanes consume (``HarnessLane.from_backend``). Full build output goes to build_log_path(log_path);
    raises BackendFailure (``code``, ``kind``, ``record``) for the job wrapper.

    The record is deterministic: the same backend gives byte-identical JSON whether or not this run
    had to repair it (what was repaired is logged on stderr, i.e. the rule's log), so Snakemake's
    checksum of the record keeps downstream jobs up to date after a repair-free rerun."""
    spec = lane_spec(lane, config)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    before = dict(probe) if probe is not None else probe_backend(spec, cache)
    mode = resolve_repair_mode(repair)
    print(
        f"backend {lane}: probe before: present={before.get('present')} "
        f"{before.get('problem', '')}; repair mode {mode} ({repair_why or 'resolved here'}); "
        f"build output: {build_log_path(log_path)}",
        file=sys.stderr,
    )
    try:
        ident = provision_backend(spec, cache, build_log_path(log_path), mode, jobs=max(1, min(int(threads), 2)))
    except BackendFailure as f:
        if f.code == EXIT_NETWORK and spec.existing_dir_env:
            f.hint = (f"{f.hint}; or set {spec.existing_dir_env} to an existing checkout/build "
                      "(skips the clone), or run the offline lanes: make demo")
        raise
    performed = not before.get("present") or mode == "always"
    print(f"backend {lane}: {'repaired' if performed else 'already present'}", file=sys.stderr)
    record: dict[str, Any] = {
        "lane": lane,
        "kind": spec.kind,
        "engine": ident.get("engine"),
        "identity": ident,
        "probe": probe_backend(spec, cache),
        "repair": {"mode": mode, "why": repair_why},
    }
    if spec.kind == "harness":
        record["harness"] = ident["harness_path"]
    return record


# ============================================================================================ CLI


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity_both.provision.backends", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("probe", "provision"):
        p = sub.add_parser(name)
        p.add_argument("backend")
        p.add_argument("--cache-dir", type=Path, default=None)
        p.add_argument("--config", type=Path, default=None, help="JSON file: {backend name: spec mapping}")
        p.add_argument("--out", type=Path, default=None, help="write the JSON result here (atomically)")
        if name == "provision":
            p.add_argument("--log", type=Path, default=None)
            p.add_argument("--repair", default="default", choices=("auto", "never", "always", "default"))
            p.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args(argv)
    cfg = json.loads(a.config.read_text()).get(a.backend) if a.config else None
    cache_dir = a.cache_dir or default_cache_dir()
    log_path = getattr(a, "log", None) or (cache_dir / "logs" / f"{a.backend}.log")
    try:
        spec = spec_from_config(a.backend, cfg)
        if a.cmd == "probe":
            result = probe_backend(spec, cache_dir)
        else:
            result = provision_backend(spec, cache_dir, log_path, a.repair, jobs=a.jobs)
            failure_record_path(log_path).unlink(missing_ok=True)
    except BackendFailure as f:
        if a.cmd == "provision":
            rec = write_failure_record(failure_record_path(log_path), f, a.backend)
            print(f"{f}\nfailure record: {rec}", file=sys.stderr)
        else:
            print(str(f), file=sys.stderr)
        return f.code
    text = json.dumps(result, indent=2, sort_keys=True) + "\n"
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.out.with_name(a.out.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, a.out)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
