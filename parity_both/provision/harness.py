"""Build and run the C++ harness (harness/parity_harness.cpp) for one llama.cpp-family engine.

Two ways to get a harness (``build_harness``):

* from a source tree: the engine is built first (parity_both.provision.build.build_engine, into
  ``<out_root>/lib`` and ``<out_root>/include``), then the harness is compiled against it with the
  run path ``$ORIGIN/../../lib`` -- the whole ``out_root`` can be built in a temporary directory and
  renamed into place;
* against an existing library directory (e.g. the installed llama-cpp-python's ``llama_cpp/lib``)
  plus the headers of the SAME version (its sdist's ``vendor/llama.cpp``): only the harness is
  compiled, with that directory as an absolute run path.

The llama.h generation is probed by the harness's CMake (check_cxx_source_compiles), never grepped,
and reported by the binary itself (``parity_harness info``, see ``run_harness``). The lane that
drives the binary is parity_both.lanes.harness.HarnessLane.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from parity_both.provision.build import (
    HarnessBuildError,
    Progress,
    atomic_dir,
    build_engine,
    cmake_cache,
    compiler_env,
    compiler_version,
    engine_build_problem,
    ensure_writable_dir,
    generator_args,
    run_logged,
)

HARNESS_SOURCE_DIR = Path(__file__).resolve().parents[2] / "harness"
HARNESS_SOURCES = ("parity_harness.cpp", "CMakeLists.txt")
HARNESS_BINARY = "parity_harness"
HARNESS_RECORD = "harness.json"  # written last into a harness build: no record, no harness


class HarnessRunError(RuntimeError):
    """The harness binary ran but reported a failure (its JSON status is in ``status``)."""

    def __init__(self, message: str, status: dict[str, Any] | None = None, returncode: int | None = None) -> None:
        super().__init__(message)
        self.status = status or {}
        self.returncode = returncode


def harness_source_digest() -> str:
    h = hashlib.sha256()
    for name in HARNESS_SOURCES:
        h.update(name.encode() + b"\0" + (HARNESS_SOURCE_DIR / name).read_bytes() + b"\0")
    return h.hexdigest()


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

    def __post_init__(self) -> None:
        # normalised: `info` runs from a temporary folder renamed after the check, and its
        # `tmp/bin/../../lib/...` paths stop resolving once `tmp` is gone (records of older builds too)
        self.libraries = [os.path.normpath(p) for p in self.libraries]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HarnessBuild:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @classmethod
    def load(cls, path: Path) -> HarnessBuild:
        return cls.from_dict(json.loads(Path(path).read_text()))


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
        *([f"-DCMAKE_CXX_COMPILER={cxx}"] if cxx else []),
    ]
    env = compiler_env(None, cxx)
    progress("configure harness", "probing llama.h")
    t0 = time.monotonic()
    configure = ["cmake", "-S", HARNESS_SOURCE_DIR, "-B", build_dir, *generator_args(), *args]
    run_logged(configure, log_path, "configure", env=env)
    progress("compile harness")
    run_logged(["cmake", "--build", build_dir, "-j", str(jobs)], log_path, "compile", env=env)
    t_build = time.monotonic() - t0
    cache = cmake_cache(build_dir)
    bin_dir = out_dir / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(build_dir / HARNESS_BINARY, bin_dir / HARNESS_BINARY)
    shutil.rmtree(build_dir, ignore_errors=True)

    progress("verify harness", "parity_harness info")
    info = run_harness(bin_dir / HARNESS_BINARY, ["info"], phase="verify")
    build = HarnessBuild(
        harness_path=str(bin_dir / HARNESS_BINARY),
        api_generation=str(info["api_generation"]),
        api_features=list(info["api_features"]),
        lib_dir=str(Path(lib_dir).resolve()),
        include_dirs=[str(Path(d).resolve()) for d in include_dirs],
        libraries=list(info.get("libraries", [])),
        compiler=_harness_compiler(cache, cxx),
        harness_cmake_args=args,
        harness_digest=digest,
        seconds={"harness": round(t_build, 1)},
    )
    (out_dir / "harness.json").write_text(json.dumps(build.to_dict(), indent=2, sort_keys=True) + "\n")
    progress("harness ready", f"{build.api_generation} in {t_build:.1f}s")
    return build


def _harness_compiler(cache: dict[str, str], cxx: str | None) -> dict[str, str]:
    cxx_comp = cache.get("CMAKE_CXX_COMPILER", cxx or "c++")
    flags = (cache.get("CMAKE_CXX_FLAGS", ""), cache.get("CMAKE_CXX_FLAGS_RELEASE", ""), "-Wall -Wextra")
    return {
        "cxx": cxx_comp,
        "cxx_version": compiler_version(cxx_comp),
        "cxx_flags": " ".join(x for x in flags if x),
    }


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
        engine = _engine_for(out_root, Path(engine_src), log_path, cc, cxx, extra_cmake_args, jobs, progress)
        inc, libs, rpath = [out_root / "include"], out_root / "lib", "$ORIGIN/../../lib"
    elif lib_dir is not None and include_dirs:
        inc, libs = [Path(d) for d in include_dirs], Path(lib_dir)
        rpath = str(libs.resolve())
        if not (libs / "libllama.so").exists():
            raise HarnessBuildError("prepare", f"no libllama.so in {libs}", errno_=errno.ENOENT)
        out_root.mkdir(parents=True, exist_ok=True)
    else:
        raise ValueError("build_harness needs engine_src, or lib_dir and include_dirs")
    hdir = out_root / f"harness-{harness_source_digest()[:16]}"
    if (hdir / HARNESS_RECORD).is_file():
        progress("harness cached", str(hdir))
        return HarnessBuild.load(hdir / HARNESS_RECORD)
    try:
        with atomic_dir(hdir, complete=lambda d: (d / HARNESS_RECORD).is_file()) as tmp:
            build = compile_harness(inc, libs, tmp, log_path, rpath=rpath, cxx=cxx, jobs=jobs, progress=progress)
            build.engine = engine
            build.harness_path = str(hdir / "bin" / HARNESS_BINARY)
            (tmp / HARNESS_RECORD).write_text(json.dumps(build.to_dict(), indent=2, sort_keys=True) + "\n")
    except BaseException:
        with contextlib.suppress(OSError):
            out_root.rmdir()  # only when empty (link mode): no empty shell left behind
        raise
    return build


def _engine_for(
    out_root: Path,
    engine_src: Path,
    log_path: Path,
    cc: str | None,
    cxx: str | None,
    extra_cmake_args: Sequence[str],
    jobs: int,
    progress: Progress,
) -> dict[str, Any]:
    """The engine build record under out_root, building the engine (atomically) when absent or not whole
    (an engine build without its record, or whose libraries differ from it, is replaced, never reused)."""
    problem = engine_build_problem(out_root, verify_hashes=True) if out_root.exists() else "absent"
    if problem is None:
        progress("engine cached", str(out_root))
        return dict(json.loads((out_root / "engine.json").read_text()))
    if out_root.exists():
        progress("rebuild engine", problem)
    with atomic_dir(out_root, complete=lambda d: engine_build_problem(d, verify_hashes=True) is None) as tmp:
        return build_engine(
            engine_src,
            tmp,
            log_path,
            cc=cc,
            cxx=cxx,
            extra_cmake_args=extra_cmake_args,
            jobs=jobs,
            progress=progress,
        )


# ---------------------------------------------------------------------------------------- running


@dataclass
class ProgramResult:
    """One request's outcome, before any interpretation: what lane-check judges."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    status: dict[str, Any] | None  # the last stdout line parsed as a JSON object, else None

    @property
    def lines(self) -> list[str]:
        return [ln for ln in self.stdout.splitlines() if ln.strip()]


def run_program(argv: Sequence[str], timeout: float = 600.0) -> ProgramResult:
    """Run one request (stdin closed); never raises for the program's own failures (a program that
    cannot be started, or times out, gives returncode -1 and no status)."""
    argv = [str(a) for a in argv]
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return ProgramResult(argv, -1, "", f"{type(exc).__name__}: {exc}", None)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    status = None
    if lines:
        try:
            parsed = json.loads(lines[-1])
            status = parsed if isinstance(parsed, dict) else None
        except json.JSONDecodeError:
            status = None
    return ProgramResult(argv, proc.returncode, proc.stdout, proc.stderr, status)


def run_harness(
    binary: Path | str, args: Sequence[str], *, phase: str = "run", timeout: float = 600.0
) -> dict[str, Any]:
    """Run the harness once; return its JSON status (raise on failure)."""
    res = run_program([binary, *args], timeout=timeout)
    status = res.status or {}
    if res.returncode != 0 or not status.get("ok"):
        detail = status.get("error") or res.stderr.strip()[-2000:] or f"exit status {res.returncode}"
        if phase == "verify":
            raise HarnessBuildError("verify", f"the built harness does not run: {detail}")
        raise HarnessRunError(
            f"parity_harness {args[0] if args else ''} failed (exit status {res.returncode}): {detail}",
            status,
            res.returncode,
        )
    return status
