"""Build and drive the C++ harness (harness/parity_harness.cpp) for one llama.cpp-family engine.

Two ways to get a harness:

* from a source tree (llama.cpp, a llama.cpp tree inside a PyPI sdist, BitNet.cpp's top level):
  configure + build only the engine's ``llama`` target (shared libraries), copy the libraries and
  headers into ``<out_root>/lib`` and ``<out_root>/include``, then compile the harness against them
  with the run path ``$ORIGIN/../../lib`` -- the whole ``out_root`` can be built in a temporary
  directory and renamed into place;
* against an existing library directory (e.g. the installed llama-cpp-python's ``llama_cpp/lib``)
  plus the headers of the SAME version (its sdist's ``vendor/llama.cpp``): only the harness is
  compiled, with that directory as an absolute run path.

The llama.h generation is probed by the harness's CMake (check_cxx_source_compiles), never grepped,
and reported by the binary itself (``parity_harness info``).

``HarnessLane`` implements ``LaneEngine`` by running the binary in a subprocess, one request each.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy and the lane protocol are imported lazily: backends probes stay light

    pass

from parity_both.hashing import sha256_file

HARNESS_SOURCE_DIR = Path(__file__).resolve().parents[2] / "harness"
HARNESS_SOURCES = ("parity_harness.cpp", "CMakeLists.txt")
HARNESS_BINARY = "parity_harness"

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


class HarnessRunError(RuntimeError):
    """The harness binary ran but reported a failure (its JSON status is in ``status``)."""

    def __init__(
        self, message: str, status: dict[str, Any] | None = None, returncode: int | None = None
    ) -> None:
        super().__init__(message)
        self.status = status or {}
        self.returncode = returncode


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


def harness_source_digest() -> str:
    h = hashlib.sha256()
    for name in HARNESS_SOURCES:
        h.update(name.encode() + b"\0" + (HARNESS_SOURCE_DIR / name).read_bytes() + b"\0")
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    return sha256_file(path)


def _log_write(log_path: Path, text: str) -> None:
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
    _log_write(log_path, f"\n$ {' '.join(str(c) for c in cmd)}\n")
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
        _log_write(log_path, f"[not found] {exc}\n")
        raise HarnessBuildError(
            phase, f"{cmd[0]} not found: install it", log_path=log_path, errno_=exc.errno, cmd=cmd
        ) from exc
    except subprocess.TimeoutExpired as exc:
        _log_write(log_path, f"[timeout after {timeout}s]\n")
        raise HarnessBuildError(
            phase, f"{phase} timed out after {timeout}s", log_path=log_path, errno_=errno.ETIMEDOUT, cmd=cmd
        ) from exc
    _log_write(log_path, f"[exit status {proc.returncode}]\n")
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
        raise HarnessBuildError(
            phase, f"cannot write to {path}: {exc.strerror or exc}", errno_=exc.errno
        ) from exc


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of final; rename it to final on success, delete it on failure."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        if final.exists():  # built concurrently by someone else: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def _cmake_cache(build_dir: Path) -> dict[str, str]:
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


def _compiler_env(cc: str | None, cxx: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if cc:
        env["CC"] = cc
    if cxx:
        env["CXX"] = cxx
    return env


def _generator_args() -> list[str]:
    return ["-G", "Ninja"] if shutil.which("ninja") else []


# ---------------------------------------------------------------------------------------- records


@dataclass
class HarnessBuild:
    """What was built, with what: the identity a lane reports."""

    harness_path: str
    api_generation: str
    api_features: list[str]
    lib_dir: str
    include_dirs: list[str]
    libraries: list[str]  # what the binary actually loaded (dl_iterate_phdr)
    compiler: dict[str, str]
    harness_cmake_args: list[str]
    harness_digest: str
    engine: dict[str, Any] = field(default_factory=dict)  # engine build record (source builds)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HarnessBuild:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @classmethod
    def load(cls, path: Path) -> HarnessBuild:
        return cls.from_dict(json.loads(Path(path).read_text()))


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
    args = [*ENGINE_BASE_CMAKE_ARGS]
    if tree_has_cmake_option(src_dir, "LLAMA_BUILD_TOOLS"):
        args.append(TOOLS_OFF)
    if cc:
        args.append(f"-DCMAKE_C_COMPILER={cc}")
    if cxx:
        args.append(f"-DCMAKE_CXX_COMPILER={cxx}")
    args.extend(extra_cmake_args)
    env = _compiler_env(cc, cxx)
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(jobs))

    progress("configure engine", f"{src_dir} ({' '.join(args)})")
    t0 = time.monotonic()
    run_logged(
        ["cmake", "-S", src_dir, "-B", build_dir, *_generator_args(), *args], log_path, "configure", env=env
    )
    t_conf = time.monotonic() - t0
    progress("build engine", f"target llama, -j{jobs} (full output: {log_path})")
    t0 = time.monotonic()
    run_logged(
        ["cmake", "--build", build_dir, "--target", "llama", "-j", str(jobs)], log_path, "compile", env=env
    )
    t_build = time.monotonic() - t0
    cache = _cmake_cache(build_dir)

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
        raise HarnessBuildError(
            "compile", f"the build produced no libllama.so (see {log_path})", log_path=log_path
        )
    inc_dir = out_dir / "include"
    inc_dir.mkdir(parents=True, exist_ok=True)
    for hdr_dir in (llama_tree / "include", llama_tree / "ggml" / "include"):
        for hdr in sorted(hdr_dir.glob("*.h")):
            shutil.copy2(hdr, inc_dir / hdr.name)
    shutil.rmtree(build_dir, ignore_errors=True)

    c_comp = cache.get("CMAKE_C_COMPILER", cc or "cc")
    cxx_comp = cache.get("CMAKE_CXX_COMPILER", cxx or "c++")
    record: dict[str, Any] = {
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
        "flags": {
            k: cache.get(k, "")
            for k in (
                "CMAKE_BUILD_TYPE",
                "CMAKE_C_FLAGS",
                "CMAKE_CXX_FLAGS",
                "CMAKE_C_FLAGS_RELEASE",
                "CMAKE_CXX_FLAGS_RELEASE",
                "GGML_NATIVE",
                "GGML_OPENMP",
                "BUILD_SHARED_LIBS",
            )
        },
        "libraries": copied,
        "seconds": {"configure": round(t_conf, 1), "build": round(t_build, 1)},
    }
    (out_dir / "engine.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    progress("engine built", f"configure {t_conf:.1f}s, build {t_build:.1f}s")
    return record


# ---------------------------------------------------------------------------------------- harness


def compile_harness(
    include_dirs: Sequence[Path],
    lib_dir: Path,
    out_dir: Path,
    log_path: Path,
    *,
    rpath: str,
    cxx: str | None = None,
    jobs: int = 2,
    progress: Progress | None = None,
) -> HarnessBuild:
    """Compile harness/parity_harness.cpp into out_dir/bin (out_dir/.build is the CMake tree),
    run ``parity_harness info`` to prove it loads, write out_dir/harness.json."""
    progress = progress or Progress()
    out_dir = Path(out_dir)
    build_dir = out_dir / ".build"
    ensure_writable_dir(build_dir)
    digest = harness_source_digest()
    args = [
        f"-DLLAMA_INCLUDE_DIRS={';'.join(str(Path(d).resolve()) for d in include_dirs)}",
        f"-DLLAMA_LIB_DIR={Path(lib_dir).resolve()}",
        f"-DHARNESS_RPATH={rpath}",
        f"-DHARNESS_VERSION={digest[:12]}",
        "-DCMAKE_BUILD_TYPE=Release",
    ]
    if cxx:
        args.append(f"-DCMAKE_CXX_COMPILER={cxx}")
    env = _compiler_env(None, cxx)
    progress("configure harness", "probing llama.h")
    t0 = time.monotonic()
    run_logged(
        ["cmake", "-S", HARNESS_SOURCE_DIR, "-B", build_dir, *_generator_args(), *args],
        log_path,
        "configure",
        env=env,
    )
    progress("compile harness")
    run_logged(["cmake", "--build", build_dir, "-j", str(jobs)], log_path, "compile", env=env)
    t_build = time.monotonic() - t0
    cache = _cmake_cache(build_dir)
    bin_dir = out_dir / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(build_dir / HARNESS_BINARY, bin_dir / HARNESS_BINARY)
    shutil.rmtree(build_dir, ignore_errors=True)

    progress("verify harness", "parity_harness info")
    info = run_harness(bin_dir / HARNESS_BINARY, ["info"], phase="verify")
    cxx_comp = cache.get("CMAKE_CXX_COMPILER", cxx or "c++")
    build = HarnessBuild(
        harness_path=str(bin_dir / HARNESS_BINARY),
        api_generation=str(info["api_generation"]),
        api_features=list(info["api_features"]),
        lib_dir=str(Path(lib_dir).resolve()),
        include_dirs=[str(Path(d).resolve()) for d in include_dirs],
        libraries=list(info.get("libraries", [])),
        compiler={
            "cxx": cxx_comp,
            "cxx_version": compiler_version(cxx_comp),
            "cxx_flags": " ".join(
                x
                for x in (
                    cache.get("CMAKE_CXX_FLAGS", ""),
                    cache.get("CMAKE_CXX_FLAGS_RELEASE", ""),
                    "-Wall -Wextra",
                )
                if x
            ),
        },
        harness_cmake_args=args,
        harness_digest=digest,
        seconds={"harness": round(t_build, 1)},
    )
    (out_dir / "harness.json").write_text(json.dumps(build.to_dict(), indent=2, sort_keys=True) + "\n")
    progress("harness ready", f"{build.api_generation} in {t_build:.1f}s")
    return build


def build_harness(
    out_root: Path,
    log_path: Path,
    *,
    engine_src: Path | None = None,
    lib_dir: Path | None = None,
    include_dirs: Sequence[Path] = (),
    cc: str | None = None,
    cxx: str | None = None,
    extra_cmake_args: Sequence[str] = (),
    jobs: int = 2,
    progress: Progress | None = None,
) -> HarnessBuild:
    """Build (or reuse) a harness under out_root, atomically.

    Source mode (engine_src): out_root/{lib,include,engine.json} is the engine build (reused when
    present), out_root/harness-<digest>/ the harness (rebuilt only when the harness sources change).
    Link mode (lib_dir + include_dirs of the same version): only out_root/harness-<digest>/ is built,
    with lib_dir as its absolute run path. Full compiler output goes to log_path.
    """
    progress = progress or Progress()
    out_root = Path(out_root)
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    ensure_writable_dir(out_root.parent)
    engine: dict[str, Any] = {}
    if engine_src is not None:
        if not (out_root / "engine.json").is_file():
            with atomic_dir(out_root) as tmp:
                engine = build_engine(
                    Path(engine_src),
                    tmp,
                    log_path,
                    cc=cc,
                    cxx=cxx,
                    extra_cmake_args=extra_cmake_args,
                    jobs=jobs,
                    progress=progress,
                )
        else:
            engine = json.loads((out_root / "engine.json").read_text())
            progress("engine cached", str(out_root))
        inc = [out_root / "include"]
        libs = out_root / "lib"
        rpath = "$ORIGIN/../../lib"
    elif lib_dir is not None and include_dirs:
        inc = [Path(d) for d in include_dirs]
        libs = Path(lib_dir)
        rpath = str(libs.resolve())
        if not (libs / "libllama.so").exists():
            raise HarnessBuildError("prepare", f"no libllama.so in {libs}", errno_=errno.ENOENT)
        out_root.mkdir(parents=True, exist_ok=True)
    else:
        raise ValueError("build_harness needs engine_src, or lib_dir and include_dirs")
    digest = harness_source_digest()
    hdir = out_root / f"harness-{digest[:16]}"
    if (hdir / "harness.json").is_file():
        progress("harness cached", str(hdir))
        return HarnessBuild.load(hdir / "harness.json")
    try:
        with atomic_dir(hdir) as tmp:
            build = compile_harness(
                inc, libs, tmp, log_path, rpath=rpath, cxx=cxx, jobs=jobs, progress=progress
            )
            build.engine = engine
            build.harness_path = str(hdir / "bin" / HARNESS_BINARY)
            (tmp / "harness.json").write_text(json.dumps(build.to_dict(), indent=2, sort_keys=True) + "\n")
    except BaseException:
        with contextlib.suppress(OSError):
            out_root.rmdir()  # only when empty (link mode): no empty shell left behind
        raise
    return build


# ---------------------------------------------------------------------------------------- running


def run_harness(
    binary: Path | str, args: Sequence[str], *, phase: str = "run", timeout: float = 600.0
) -> dict[str, Any]:
    """Run the harness once; return its JSON status (raise on failure)."""
    try:
        proc = subprocess.run(
            [str(binary), *[str(a) for a in args]],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except OSError as exc:
        raise HarnessRunError(f"cannot run {binary}: {exc}") from exc
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    status: dict[str, Any] = {}
    if lines:
        with contextlib.suppress(json.JSONDecodeError):
            status = json.loads(lines[-1])
    if proc.returncode != 0 or not status.get("ok"):
        detail = status.get("error") or proc.stderr.strip()[-2000:] or f"exit status {proc.returncode}"
        if phase == "verify":
            raise HarnessBuildError("verify", f"the built harness does not run: {detail}")
        raise HarnessRunError(
            f"parity_harness {args[0] if args else ''} failed (exit status {proc.returncode}): {detail}",
            status,
            proc.returncode,
        )
    return status
