"""Fetching a backend's source or package: git (pinned commit, submodules), a PyPI sdist, a pip
install, each retried with exponential backoff when the network fails.

Failures become ``BackendFailure``: an unreachable source 3 (after the retries), an unwritable
directory 4, a failed package build 5, a missing commit or distribution 2. Everything is fetched into
a temporary directory renamed into the cache at the end (``ensure_source``), so nothing partial stays.
"""

from __future__ import annotations

import errno
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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from parity_both.hashing import ENV_CACHE, sha256_file
from parity_both.provision.build import (
    ENGINE_BASE_CMAKE_ARGS,
    HarnessBuildError,
    Progress,
    append_log,
    atomic_dir,
    ensure_writable_dir,
    retire_dir,
)
from parity_both.provision.failures import (
    EXIT_BUILD,
    EXIT_NETWORK,
    EXIT_PERMISSION,
    EXIT_SOURCE,
    BackendFailure,
)
from parity_both.provision.specs import (
    SDIST_SHA256,
    BackendSpec,
    SourceSpec,
    digest,
    pypi_name_version,
    run_git,
    slug,
)

ENV_SDIST_DIR = "PARITY_BOTH_SDIST_DIR"  # a directory that may already hold NAME-VERSION.tar.gz


class _Transient(Exception):
    """A failure worth retrying (network); becomes BackendFailure(3) when the retries run out."""

    def __init__(self, message: str, errno_: int | None = None, returncode: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_
        self.returncode = returncode


def check_writable(path: Path, log_path: Path | None) -> None:
    """Create path and prove it is writable, else BackendFailure(4)."""
    try:
        ensure_writable_dir(path)
    except HarnessBuildError as exc:
        raise BackendFailure(
            EXIT_PERMISSION,
            "prepare",
            f"{exc.message} (errno {errno.errorcode.get(exc.errno or 0, exc.errno)})",
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


def with_retries(
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
            append_log(log_path, f"[attempt {attempt}/{retries}] {what}: {exc}\n")
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


def run_to_log(
    cmd: Sequence[str],
    log_path: Path,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 3600,
) -> subprocess.CompletedProcess[str]:
    append_log(log_path, f"\n$ {' '.join(shlex.quote(str(c)) for c in cmd)}\n")
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
    append_log(log_path, proc.stdout + proc.stderr + f"[exit status {proc.returncode}]\n")
    return proc


def _is_local_url(url: str) -> bool:
    return urllib.parse.urlparse(url).scheme in ("", "file")


_GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true"}


def fetch_git(
    spec: BackendSpec, dest: Path, log_path: Path, *, retries: int, backoff: float, progress: Progress
) -> None:
    """Clone url into dest (a fresh temporary dir), check out the pinned commit, init submodules."""
    s = spec.source
    env = {**os.environ, **_GIT_ENV}
    # Local "upstreams" (file:// or a path) are allowed to use local submodules too; git blocks the
    # file transport for submodules by default since 2.38.1 (CVE-2022-39253).
    cfg = ["-c", "protocol.file.allow=always"] if _is_local_url(s.url) else []

    def clone() -> None:
        shutil.rmtree(dest, ignore_errors=True)
        proc = run_to_log(["git", *cfg, "clone", "--no-checkout", s.url, dest], log_path, env=env)
        if proc.returncode != 0:
            check_writable(dest.parent, log_path)  # a local write failure is not a network problem
            # git decides reachability (it knows proxies and credentials); a direct connect/stat then
            # says how the endpoint fails (errno), for the record
            err = _endpoint_error(s.url) if not _proxied(s.url) else None
            raise _Transient(
                f"git clone exited {proc.returncode}: {_last_line(proc.stderr)}"
                + (f" [{s.url}: {err.strerror or err}, errno {err.errno}]" if err is not None else ""),
                errno_=err.errno if err is not None else None,
                returncode=proc.returncode,
            )

    def submodules() -> None:
        p = run_to_log(["git", *cfg, "-C", dest, "submodule", "update", "--init", "--recursive"], log_path, env=env)
        if p.returncode != 0:
            raise _Transient(
                f"git submodule update exited {p.returncode}: {_last_line(p.stderr)}", returncode=p.returncode
            )

    progress("fetch", f"git clone {s.url}")
    with_retries(f"git clone {s.url}", clone, retries=retries, backoff=backoff, log_path=log_path, progress=progress)
    _checkout_pinned(spec, dest, log_path, env)
    if s.submodules:
        progress("fetch", "git submodule update --init --recursive")
        with_retries(
            "git submodule update",
            submodules,
            retries=retries,
            backoff=backoff,
            log_path=log_path,
            progress=progress,
        )
    verify_checkout(spec, dest, log_path)


def verify_checkout(spec: BackendSpec, repo: Path, log_path: Path) -> None:
    """The checkout's HEAD is the pinned commit (after the checkout, and whenever a cached checkout is
    reused), else BackendFailure(2, checkout): something moved it (a hook, a tampered cache)."""
    s = spec.source
    proc = run_git(["rev-parse", "HEAD"], cwd=repo)
    head = proc.stdout.strip() if proc.returncode == 0 else f"unreadable ({_last_line(proc.stderr)})"
    append_log(log_path, f"[verify] {repo}: HEAD {head}, pinned {s.commit}\n")
    if head != s.commit:
        raise BackendFailure(
            EXIT_SOURCE,
            "checkout",
            f"the checkout of {s.url} is at {head}, not at the pinned commit {s.commit}",
            log_path=log_path,
            hint=f"remove {repo.parent} (it is fetched again) and check what moved it (git hooks, the URL)",
            details={"head": head, "pinned": s.commit, "path": str(repo)},
        )


def _last_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[-1]


def _checkout_pinned(spec: BackendSpec, dest: Path, log_path: Path, env: Mapping[str, str]) -> None:
    """Check out the pinned commit (fetching it explicitly when the clone did not bring it)."""
    s = spec.source
    proc = run_to_log(["git", "-C", dest, "checkout", "--detach", s.commit], log_path, env=env)
    if proc.returncode == 0:
        return
    fetched = run_to_log(["git", "-C", dest, "fetch", "origin", s.commit], log_path, env=env)
    proc = run_to_log(["git", "-C", dest, "checkout", "--detach", s.commit], log_path, env=env)
    if fetched.returncode != 0 or proc.returncode != 0:
        raise BackendFailure(
            EXIT_SOURCE,
            "checkout",
            f"pinned commit {s.commit} is not in {s.url}",
            log_path=log_path,
            hint="fix the pinned commit in the backend spec",
        )


_PIP_NETWORK = re.compile(
    r"NewConnectionError|Max retries exceeded|Temporary failure in name resolution|"
    r"Network is unreachable|Connection refused|ConnectTimeoutError|ReadTimeoutError|"
    r"ProxyError|SSLError"
)


def _index_endpoint() -> str:
    return os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple/"


def run_pip(
    args: Sequence[str],
    what: str,
    log_path: Path,
    *,
    retries: int,
    backoff: float,
    progress: Progress,
    phase: str,
) -> None:
    """Run pip (retried while the index is unreachable); failures classified by _pip_failure."""
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    if any("llama-cpp-python" in a or "llama_cpp_python" in a for a in args) and "CMAKE_ARGS" not in env:
        # llama-cpp-python compiles llama.cpp: build it like the Makefile does (portable AVX2, no AMX:
        # -march=native crashes in ggml's AMX kernels where the CPU advertises AMX without granting it)
        env["CMAKE_ARGS"] = " ".join(
            a for a in ENGINE_BASE_CMAKE_ARGS if a.startswith("-DGGML_") and a != "-DGGML_OPENMP=OFF"
        )
        env.setdefault("PIP_NO_CACHE_DIR", "1")  # never reuse a wheel pip cached with other flags

    def attempt() -> None:
        proc = run_to_log([sys.executable, "-m", "pip", *args, "--retries", "2", "--timeout", "30"], log_path, env=env)
        if proc.returncode != 0:
            raise _pip_failure(proc, what, log_path, phase)

    progress(phase, what)
    with_retries(what, attempt, retries=retries, backoff=backoff, log_path=log_path, progress=progress)


def _pip_failure(
    proc: subprocess.CompletedProcess[str], what: str, log_path: Path, phase: str
) -> BackendFailure | _Transient:
    """Classify a failed pip run: permission 4, wheel build 5, unreachable index -> retry (then 3),
    no such distribution 2, anything else 5."""
    text = proc.stdout + proc.stderr
    details = {"returncode": proc.returncode}
    if "Permission denied" in text or "[Errno 13]" in text or "[Errno 30]" in text:
        return BackendFailure(
            EXIT_PERMISSION,
            phase,
            f"{what}: permission denied (see log)",
            log_path=log_path,
            hint="the Python environment or target directory is not writable",
            details=details,
        )
    if re.search(r"Failed building wheel|Failed to build|subprocess-exited-with-error", text):
        return BackendFailure(
            EXIT_BUILD, phase, f"{what}: building the package failed (see log)", log_path=log_path, details=details
        )
    idx_err = None if _proxied(_index_endpoint()) else _endpoint_error(_index_endpoint())
    if idx_err is not None or _PIP_NETWORK.search(text):
        return _Transient(
            f"{what}: index unreachable ({idx_err or 'network error in pip output'})",
            errno_=getattr(idx_err, "errno", None),
            returncode=proc.returncode,
        )
    if "No matching distribution" in text or "Could not find a version" in text:
        return BackendFailure(EXIT_SOURCE, phase, f"{what}: no such distribution", log_path=log_path, details=details)
    return BackendFailure(
        EXIT_BUILD, phase, f"{what} failed (exit status {proc.returncode})", log_path=log_path, details=details
    )


def pinned_sdist_sha256(source: SourceSpec) -> str | None:
    return source.sha256.lower() or SDIST_SHA256.get(source.requirement)


def verify_sdist(archive: Path, requirement: str, pinned: str | None, log_path: Path) -> str:
    """The archive's sha256, refused (BackendFailure 2, checksum) when it differs from the pin. Without a
    pin, a downloaded archive was checked by pip against the index's own hash."""
    sha = sha256_file(archive)
    append_log(log_path, f"[verify] {archive.name}: sha256 {sha}, pinned {pinned or '(none)'}\n")
    if pinned and sha != pinned:
        raise BackendFailure(
            EXIT_SOURCE,
            "checksum",
            f"{archive} (for {requirement}) has sha256 {sha}, not the pinned {pinned}",
            log_path=log_path,
            hint="the archive was altered or is another file: remove it (or fix the pinned sha256) and rerun",
            details={"sha256": sha, "pinned": pinned, "path": str(archive)},
        )
    return sha


def fetch_sdist(
    source: SourceSpec, dest: Path, log_path: Path, *, retries: int, backoff: float, progress: Progress
) -> dict[str, str]:
    """pip download the sdist into a temp dir (or take it from $PARITY_BOTH_SDIST_DIR), verify its sha256
    (verify_sdist), extract it to dest (fresh dir). Returns file + sha256."""
    requirement = source.requirement
    name, version = pypi_name_version(requirement)
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
            append_log(log_path, f"[sdist] using {files[0]} from ${ENV_SDIST_DIR}\n")
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
            run_pip(
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
        sha = verify_sdist(files[0], requirement, pinned_sdist_sha256(source), log_path)
        progress("extract", files[0].name)
        with tarfile.open(files[0]) as tf:
            tf.extractall(dest, filter="data")
    return {"sdist": files[0].name, "sdist_sha256": sha}


def ensure_source(
    spec: BackendSpec, cache_dir: Path, log_path: Path, *, retries: int, backoff: float, progress: Progress
) -> Path:
    """The source tree to build (fetched into cache_dir/sources atomically when needed)."""
    s = spec.source
    if s.type == "local":
        path = Path(s.path)
        if not path.is_dir():
            raise BackendFailure(EXIT_SOURCE, "fetch", f"local source {path} is not a directory", log_path=log_path)
        return path
    sources = cache_dir / "sources"
    check_writable(sources, log_path)
    if s.type == "git":
        final = (
            sources / f"git-{slug(Path(urllib.parse.urlparse(s.url).path).name)}-{s.commit[:12]}-"
            f"{digest([s.url, s.commit, s.submodules])[:8]}"
        )
        if final.is_dir():
            verify_checkout(spec, final / "repo", log_path)
        else:
            with atomic_dir(final) as tmp:
                fetch_git(spec, tmp / "repo", log_path, retries=retries, backoff=backoff, progress=progress)
                (tmp / "repo" / SOURCE_META).write_text(
                    json.dumps({"git_url": s.url, "git_commit": s.commit}, sort_keys=True) + "\n"
                )
        root = final / "repo"
        return root / s.subdir if s.subdir else root
    if s.type == "sdist":
        return _ensure_sdist(spec, sources, log_path, retries=retries, backoff=backoff, progress=progress)
    raise BackendFailure(EXIT_SOURCE, "spec", f"cannot build from a {s.type} source")


SOURCE_META = ".parity-both-source.json"  # what was fetched (git url + commit, or sdist + sha256)


def _extracted_from(final: Path) -> str | None:
    try:
        return json.loads((final / "src" / SOURCE_META).read_text()).get("sdist_sha256")
    except (OSError, ValueError, AttributeError):
        return None


def _ensure_sdist(
    spec: BackendSpec, sources: Path, log_path: Path, *, retries: int, backoff: float, progress: Progress
) -> Path:
    s = spec.source
    name, version = pypi_name_version(s.requirement)
    if not version:
        raise BackendFailure(EXIT_SOURCE, "spec", f"sdist source {s.requirement!r} must be pinned (==)")
    final = sources / f"sdist-{slug(name)}-{slug(version)}"
    pinned = pinned_sdist_sha256(s)
    if final.is_dir() and pinned and _extracted_from(final) != pinned:  # extracted from another archive
        progress("refetch", f"{final} was not extracted from the pinned archive")
        retire_dir(final)
    if not final.is_dir():
        with atomic_dir(final) as tmp:
            meta = fetch_sdist(s, tmp, log_path, retries=retries, backoff=backoff, progress=progress)
            tops = [p for p in tmp.iterdir() if p.is_dir()]
            if len(tops) != 1:
                raise BackendFailure(EXIT_SOURCE, "fetch", f"unexpected sdist layout: {tops}", log_path=log_path)
            tops[0].rename(tmp / "src")
            (tmp / "src" / SOURCE_META).write_text(json.dumps(meta, sort_keys=True) + "\n")
    root = final / "src"
    tree = root / s.subdir if s.subdir else root
    if not (tree / "CMakeLists.txt").is_file():
        raise BackendFailure(
            EXIT_SOURCE, "fetch", f"{s.requirement}: no CMake project at {s.subdir or '.'}", log_path=log_path
        )
    if tree != root and not (tree / SOURCE_META).exists():
        shutil.copy2(root / SOURCE_META, tree / SOURCE_META)
    return tree
