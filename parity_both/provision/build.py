"""Build a llama.cpp-family engine's shared libraries, and the build-step plumbing the harness build
shares: logged commands, atomic output directories, compiler facts, progress lines.

From a source tree (llama.cpp, a llama.cpp tree inside a PyPI sdist, BitNet.cpp's top level),
``build_engine`` configures and builds only the engine's ``llama`` target, copies the libraries and
headers into ``<out_dir>/lib`` and ``<out_dir>/include`` and records how in ``engine.json``
(parity_both.provision.harness then compiles the harness against them).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from parity_both.hashing import sha256_file
from parity_both.jobs import process_alive

# Configure flags for the engine's own CMake project (see issue 5 / notes/llama-cpp.md).
ENGINE_BASE_CMAKE_ARGS: tuple[str, ...] = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    # Portable x86-64 AVX2, the same CPU paths as the llama lane's llama-cpp-python wheel (Makefile):
    # -march=native would also compile ggml's AMX kernels, which crash where the CPU advertises AMX
    # without granting it, and would make lanes differ by CPU feature path rather than by code.
    "-DGGML_NATIVE=OFF",
    "-DGGML_AVX=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    "-DGGML_BMI2=ON",
    "-DGGML_AVX512=OFF",
    "-DGGML_AMX_TILE=OFF",
    "-DGGML_AMX_INT8=OFF",
    "-DGGML_AMX_BF16=OFF",
    "-DGGML_OPENMP=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_CURL=OFF",
    # the libraries find each other in ONE flat lib dir (they are copied out of the build tree)
    "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
    "-DCMAKE_INSTALL_RPATH=$ORIGIN",
)
TOOLS_OFF = "-DLLAMA_BUILD_TOOLS=OFF"  # only where the tree has the option


class HarnessBuildError(Exception):
    """A build step failed. ``phase`` says which (prepare, configure, compile, verify);
    ``returncode``/``errno`` say how; the full output is in ``log_path``."""

    def __init__(
        self,
        phase: str,
        message: str,
        *,
        log_path: Path | None = None,
        returncode: int | None = None,
        errno_: int | None = None,
        cmd: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.phase = phase
        self.message = message
        self.log_path = log_path
        self.returncode = returncode
        self.errno = errno_
        self.cmd = list(cmd)


# ---------------------------------------------------------------------------------------- helpers


class Progress:
    """Phase lines with elapsed time on stderr (stdout stays free for requested output)."""

    def __init__(self, label: str = "parity-both", stream: Any = None) -> None:
        self.label = label
        self.t0 = time.monotonic()
        self.stream = stream

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def __call__(self, phase: str, message: str = "") -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        print(
            f"[{self.label} +{self.elapsed():7.1f}s] {phase}{': ' + message if message else ''}",
            file=stream,
            flush=True,
        )


def append_log(log_path: Path, text: str) -> None:
    with open(log_path, "a", encoding="utf-8", errors="replace") as fh:
        fh.write(text)


def _tail(path: Path, n: int = 15) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            return "\n".join(fh.read().decode("utf-8", errors="replace").strip().splitlines()[-n:])
    except OSError:
        return ""


def run_logged(
    cmd: Sequence[str],
    log_path: Path,
    phase: str,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
) -> None:
    """Run cmd with stdout+stderr streamed into log_path; raise HarnessBuildError(phase) on failure."""
    append_log(log_path, f"\n$ {' '.join(str(c) for c in cmd)}\n")
    try:
        with open(log_path, "ab") as log:
            proc = subprocess.run(
                [str(c) for c in cmd],
                cwd=cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=timeout,
                check=False,
            )
    except FileNotFoundError as exc:
        append_log(log_path, f"[not found] {exc}\n")
        raise HarnessBuildError(
            phase, f"{cmd[0]} not found: install it", log_path=log_path, errno_=exc.errno, cmd=cmd
        ) from exc
    except subprocess.TimeoutExpired as exc:
        append_log(log_path, f"[timeout after {timeout}s]\n")
        raise HarnessBuildError(
            phase, f"{phase} timed out after {timeout}s", log_path=log_path, errno_=errno.ETIMEDOUT, cmd=cmd
        ) from exc
    append_log(log_path, f"[exit status {proc.returncode}]\n")
    if proc.returncode != 0:
        raise HarnessBuildError(
            phase,
            f"{phase} failed (exit status {proc.returncode}):\n{_tail(log_path)}",
            log_path=log_path,
            returncode=proc.returncode,
            cmd=cmd,
        )


def ensure_writable_dir(path: Path, phase: str = "prepare") -> None:
    """Create path and prove it is writable by writing into it (os.access lies for root)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise HarnessBuildError(phase, f"cannot write to {path}: {exc.strerror or exc}", errno_=exc.errno) from exc


def _owner() -> str:
    """This process, as written into the names of its temporary build dirs (host@pid)."""
    return f"{re.sub(r'[^A-Za-z0-9.-]+', '_', os.uname().nodename)}@{os.getpid()}"


def sweep_abandoned(final: Path) -> list[Path]:
    """Remove what killed builds of final left behind: its temporary dirs and retired copies whose owner
    (named in the dir's name) was a process of this host that no longer runs. Those of a live process, or
    of another host (a cluster node sharing the cache), are left alone."""
    host, _ = _owner().split("@")
    removed = []
    for tmp in sorted(final.parent.glob(f".tmp-{final.name}@*")) + sorted(final.parent.glob(f".trash-{final.name}@*")):
        parts = tmp.name.split("@")
        stale = len(parts) == 4 and parts[1] == host and parts[2].isdigit() and not process_alive(int(parts[2]))
        if stale:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def retire_dir(path: Path) -> None:
    """Delete a directory so that it is never seen half-deleted: rename it aside first (atomic), then
    remove the renamed copy (a kill in between leaves only a ``.trash-`` dir, swept later)."""
    if not path.exists():
        return
    trash = Path(tempfile.mkdtemp(prefix=f".trash-{path.name}@{_owner()}@", dir=path.parent))
    os.rename(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: Path, complete: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of final; rename it to final on success, delete it on failure.

    The temporary dir is named after its owner (``.tmp-NAME@HOST@PID@...``) so that a later build sweeps
    it once that process is gone (a kill -9 runs no cleanup). When final already exists it is kept only if
    ``complete(final)`` says it is whole (default: existing means complete); an incomplete one is retired
    and replaced, never reused."""
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_abandoned(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}@{_owner()}@", dir=final.parent))
    whole = complete or (lambda _: True)
    try:
        yield tmp
        tmp.chmod(0o755)
        if final.exists() and whole(final):  # built concurrently by someone else: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            return
        retire_dir(final)
        try:
            os.rename(tmp, final)
        except OSError as exc:  # someone renamed theirs in between
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not whole(final):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


ENGINE_RECORD = "engine.json"  # written last into an engine build: no record, no build


def engine_build_problem(root: Path, *, verify_hashes: bool = False) -> str | None:
    """Why the engine build at root is not whole (None when it is): its record is missing or unreadable,
    or a library the record lists is missing or differs in size (and with verify_hashes, in sha256).
    Records written before the list existed are checked for lib/libllama.so only."""
    rec_path = root / ENGINE_RECORD
    try:
        rec = json.loads(rec_path.read_text())
    except FileNotFoundError:
        return f"no build record {rec_path} (an interrupted or damaged build)"
    except (OSError, ValueError) as exc:
        return f"unreadable build record {rec_path}: {exc}"
    files = rec.get("files") if isinstance(rec, dict) else None
    for rel, want in (files if isinstance(files, dict) else {"lib/libllama.so": {}}).items():
        path = root / rel
        if not path.is_file():
            return f"{path} is missing (listed in {rec_path})"
        size = path.stat().st_size
        if "size" in want and size != want["size"]:
            return f"{path} has {size} bytes, its build record says {want['size']}"
        if verify_hashes and "sha256" in want and sha256_file(path) != want["sha256"]:
            return f"{path} differs from its build record (sha256)"
    return None


def find_llama_tree(src: Path) -> Path:
    """The directory holding include/llama.h: src itself, or a submodule (BitNet: 3rdparty/llama.cpp)."""
    for cand in (src, src / "3rdparty" / "llama.cpp", src / "vendor" / "llama.cpp"):
        if (cand / "include" / "llama.h").is_file():
            return cand
    for hit in sorted(src.glob("*/*/include/llama.h")) + sorted(src.glob("*/include/llama.h")):
        return hit.parent.parent
    raise HarnessBuildError("prepare", f"no include/llama.h under {src}", errno_=errno.ENOENT)


def tree_has_cmake_option(src: Path, option: str) -> bool:
    for cml in [
        src / "CMakeLists.txt",
        *sorted(src.glob("*/CMakeLists.txt")),
        *sorted(src.glob("*/*/CMakeLists.txt")),
    ]:
        try:
            if option in cml.read_text(errors="replace"):
                return True
        except OSError:
            continue
    return False


def cmake_cache(build_dir: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        for line in (build_dir / "CMakeCache.txt").read_text(errors="replace").splitlines():
            m = re.match(r"^([A-Za-z0-9_]+):[A-Z_]+=(.*)$", line)
            if m:
                out[m.group(1)] = m.group(2)
    except OSError:
        pass
    return out


def compiler_version(exe: str) -> str:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False, timeout=30)
        return out.stdout.splitlines()[0].strip() if out.stdout else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def compiler_env(cc: str | None, cxx: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if cc:
        env["CC"] = cc
    if cxx:
        env["CXX"] = cxx
    return env


def generator_args() -> list[str]:
    return ["-G", "Ninja"] if shutil.which("ninja") else []


# ---------------------------------------------------------------------------------------- engine


def build_engine(
    src_dir: Path,
    out_dir: Path,
    log_path: Path,
    *,
    cc: str | None = None,
    cxx: str | None = None,
    extra_cmake_args: Sequence[str] = (),
    jobs: int = 2,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Configure + build the engine's ``llama`` target from src_dir (out of tree, in out_dir/.build),
    copy the shared libraries to out_dir/lib and the public headers to out_dir/include, delete the
    object tree, and write out_dir/engine.json. out_dir is expected to be a fresh (temporary) dir."""
    progress = progress or Progress()
    src_dir = Path(src_dir).resolve()
    out_dir = Path(out_dir)
    llama_tree = find_llama_tree(src_dir)
    build_dir = out_dir / ".build"
    ensure_writable_dir(build_dir)
    args = _engine_cmake_args(src_dir, cc, cxx, extra_cmake_args)
    env = compiler_env(cc, cxx)
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(jobs))

    progress("configure engine", f"{src_dir} ({' '.join(args)})")
    t0 = time.monotonic()
    run_logged(["cmake", "-S", src_dir, "-B", build_dir, *generator_args(), *args], log_path, "configure", env=env)
    t_conf = time.monotonic() - t0
    progress("build engine", f"target llama, -j{jobs} (full output: {log_path})")
    t0 = time.monotonic()
    run_logged(["cmake", "--build", build_dir, "--target", "llama", "-j", str(jobs)], log_path, "compile", env=env)
    t_build = time.monotonic() - t0
    cache = cmake_cache(build_dir)
    copied = _copy_engine_outputs(build_dir, out_dir, llama_tree, log_path)
    shutil.rmtree(build_dir, ignore_errors=True)

    record = _engine_record(src_dir, llama_tree, args, cache, cc, cxx, jobs)
    record.update(libraries=copied, seconds={"configure": round(t_conf, 1), "build": round(t_build, 1)})
    record["files"] = _file_list(out_dir, copied)
    (out_dir / ENGINE_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")  # last
    progress("engine built", f"configure {t_conf:.1f}s, build {t_build:.1f}s")
    return record


def _file_list(out_dir: Path, copied: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every library file of the build (symlinks name a listed file)."""
    out = {}
    for name in copied:
        path = out_dir / "lib" / name
        if path.is_file() and not path.is_symlink():
            out[f"lib/{name}"] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return out


def _engine_cmake_args(src_dir: Path, cc: str | None, cxx: str | None, extra_cmake_args: Sequence[str]) -> list[str]:
    args = [*ENGINE_BASE_CMAKE_ARGS]
    if tree_has_cmake_option(src_dir, "LLAMA_BUILD_TOOLS"):
        args.append(TOOLS_OFF)
    if cc:
        args.append(f"-DCMAKE_C_COMPILER={cc}")
    if cxx:
        args.append(f"-DCMAKE_CXX_COMPILER={cxx}")
    args.extend(extra_cmake_args)
    return args


def _copy_engine_outputs(build_dir: Path, out_dir: Path, llama_tree: Path, log_path: Path) -> list[str]:
    """Shared libraries into out_dir/lib (one flat dir), public headers into out_dir/include."""
    lib_dir = out_dir / "lib"
    lib_dir.mkdir(parents=True, exist_ok=True)
    copied: list[str] = []
    for so in sorted(build_dir.rglob("lib*.so*")):
        if ".dir" in so.parts[-2] or not (so.is_file() or so.is_symlink()):
            continue
        dest = lib_dir / so.name
        if dest.exists() or dest.is_symlink():
            continue
        shutil.copy2(so, dest, follow_symlinks=False)
        copied.append(so.name)
    if not (lib_dir / "libllama.so").exists():
        raise HarnessBuildError("compile", f"the build produced no libllama.so (see {log_path})", log_path=log_path)
    inc_dir = out_dir / "include"
    inc_dir.mkdir(parents=True, exist_ok=True)
    for hdr_dir in (llama_tree / "include", llama_tree / "ggml" / "include"):
        for hdr in sorted(hdr_dir.glob("*.h")):
            shutil.copy2(hdr, inc_dir / hdr.name)
    return copied


_ENGINE_FLAG_KEYS = (
    "CMAKE_BUILD_TYPE",
    "CMAKE_C_FLAGS",
    "CMAKE_CXX_FLAGS",
    "CMAKE_C_FLAGS_RELEASE",
    "CMAKE_CXX_FLAGS_RELEASE",
    "GGML_NATIVE",
    "GGML_OPENMP",
    "BUILD_SHARED_LIBS",
)


def _engine_record(
    src_dir: Path,
    llama_tree: Path,
    args: list[str],
    cache: dict[str, str],
    cc: str | None,
    cxx: str | None,
    jobs: int,
) -> dict[str, Any]:
    c_comp = cache.get("CMAKE_C_COMPILER", cc or "cc")
    cxx_comp = cache.get("CMAKE_CXX_COMPILER", cxx or "c++")
    return {
        "source_dir": str(src_dir),
        "llama_tree": str(llama_tree.relative_to(src_dir)) if llama_tree != src_dir else ".",
        "cmake_args": args,
        "target": "llama",
        "jobs": jobs,
        "compiler": {
            "c": c_comp,
            "cxx": cxx_comp,
            "c_version": compiler_version(c_comp),
            "cxx_version": compiler_version(cxx_comp),
        },
        "flags": {k: cache.get(k, "") for k in _ENGINE_FLAG_KEYS},
    }
