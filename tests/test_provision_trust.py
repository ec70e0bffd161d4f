"""Provisioning trust (issue 12, item 8): no shell ever sees a config value; a git source is used only at its
pinned commit (checked after the checkout and whenever a cached checkout is reused); an sdist is used only
when its sha256 matches the pin; repair never runs under CI unless asked. No network: local git repositories,
local archives, the cached sdists of $PARITY_BOTH_SDIST_DIR."""

from __future__ import annotations

import ast
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from parity_both.config import CI_ENV_VARS
from parity_both.hashing import sha256_file
from parity_both.provision.build import Progress
from parity_both.provision.failures import BackendFailure
from parity_both.provision.fetch import ENV_SDIST_DIR, SOURCE_META, ensure_source, verify_sdist
from parity_both.provision.probes import probe_backend
from parity_both.provision.provision import ENV_GUARD, ENV_REPAIR, ensure_backend, provision_backend, provision_lane
from parity_both.provision.specs import BUILTIN_SPECS, SDIST_SHA256, BackendSpec, SourceSpec, spec_from_config

from conftest import slow_tree

REPO = Path(__file__).resolve().parent.parent
TOY = REPO / "tools" / "lane_programs" / "toy_engine.py"
FETCH = {"retries": 1, "backoff": 0.01, "progress": Progress("test")}
SDIST_DIRS = os.environ.get(ENV_SDIST_DIR, "")  # before _clean_env removes it
METACHARS = ["x; touch PWNED1", "$(touch PWNED2)", "`touch PWNED3`", "a && touch PWNED4 | cat > PWNED5"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (*CI_ENV_VARS, ENV_REPAIR, ENV_GUARD, ENV_SDIST_DIR):
        monkeypatch.delenv(var, raising=False)


def pwned(tmp_path: Path) -> list[str]:
    """Files an injected `touch` would have made: anywhere in the test's dir, or in the working dir."""
    return sorted(str(p) for p in [*tmp_path.rglob("PWNED*"), *Path.cwd().glob("PWNED*")])


# ============================================================================ (a) no shell strings


SPAWNERS = {"run", "Popen", "call", "check_call", "check_output"}
SHELL_ONLY = {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"), ("subprocess", "getstatusoutput")}


def _shell_problems(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
        where = f"{path.relative_to(REPO)}:{node.lineno}"
        if (owner, node.func.attr) in SHELL_ONLY:
            out.append(f"{where}: {owner}.{node.func.attr} runs a shell")
        if owner != "subprocess" or node.func.attr not in SPAWNERS:
            continue
        for kw in node.keywords:
            if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                out.append(f"{where}: shell={ast.unparse(kw.value)}")
        argv = node.args[0] if node.args else None
        if isinstance(argv, (ast.JoinedStr, ast.BinOp)) or (
            isinstance(argv, ast.Constant) and isinstance(argv.value, str)
        ):
            out.append(f"{where}: the command is a string, not an argv list")
        if isinstance(argv, ast.List) and argv.elts and isinstance(argv.elts[0], ast.Constant):
            if argv.elts[0].value in ("sh", "bash") and not all(isinstance(e, ast.Constant) for e in argv.elts):
                out.append(f"{where}: a shell command built from values")
    return out


def test_no_subprocess_call_runs_a_shell_or_a_command_string() -> None:
    files = sorted((REPO / "parity_both").rglob("*.py")) + sorted((REPO / "scripts").glob("*.py"))
    assert len(files) > 50
    problems = [p for f in files for p in _shell_problems(f)]
    assert problems == []
    planted = REPO / "tests" / "_planted_shell.py"  # the audit itself finds each form
    bad = "import os, subprocess\nsubprocess.run(f'make {x}', shell=True)\n"
    bad += "os.system('x')\nsubprocess.Popen(['sh', '-c', y])\n"
    try:
        planted.write_text(bad)
        assert len(_shell_problems(planted)) == 4
    finally:
        planted.unlink()


def test_command_backend_values_with_shell_metacharacters_are_passed_literally(tmp_path: Path) -> None:
    record = tmp_path / "argv.json"
    program = tmp_path / "bin" / f"engine {METACHARS[0]}"
    wrapper = tmp_path / "engine.in"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{TOY}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    dump = "import json, sys; open(sys.argv[1], 'w').write(json.dumps(sys.argv[2:]))"
    cfg = {
        "kind": "command",
        "command": [str(program)],
        "build": [
            [sys.executable, "-c", dump, str(record), *METACHARS],
            ["mkdir", "-p", str(program.parent)],
            ["cp", str(wrapper), str(program)],
        ],
        "build_cwd": str(tmp_path),
    }
    done = ensure_backend(spec_from_config("meta", cfg), tmp_path / "cache", tmp_path / "build.log", "auto")
    assert done.repaired and done.identity["command"] == [str(program)] and done.identity["info"]["protocol"] == 1
    assert json.loads(record.read_text()) == METACHARS
    assert pwned(tmp_path) == []


def test_harness_source_path_and_cmake_args_with_shell_metacharacters(tmp_path: Path, engine_2024: Path) -> None:
    tree = slow_tree(tmp_path / f"tree {METACHARS[1]}", engine_2024, seconds=0)
    cfg = {"kind": "harness", "source": {"type": "local", "path": str(tree)}, "cmake_args": [f"-DX={METACHARS[0]}"]}
    spec = spec_from_config("meta-tree", cfg)
    ident = provision_backend(spec, tmp_path / "cache", tmp_path / "build.log", "auto")
    assert probe_backend(spec, tmp_path / "cache")["present"] is True
    assert f"-DX={METACHARS[0]}" in ident["build_flags"]["engine_cmake_args"]
    assert pwned(tmp_path) == []


# ============================================================================ (b) git at the pinned commit


def git(*args: str, cwd: Path, env: dict | None = None) -> str:
    fixed = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    proc = subprocess.run(
        ["git", "-c", "init.defaultBranch=main", *args],
        cwd=cwd,
        env={**os.environ, **fixed, **(env or {})},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.fixture
def upstream(tmp_path: Path) -> tuple[Path, str, str]:
    """A local repository with two commits: (path, the pinned one, a later one)."""
    repo = tmp_path / "upstream"
    repo.mkdir()
    git("init", "-q", cwd=repo)
    (repo / "CMakeLists.txt").write_text("# pinned\n")
    git("add", ".", cwd=repo)
    git("commit", "-qm", "pinned", cwd=repo)
    pinned = git("rev-parse", "HEAD", cwd=repo)
    (repo / "CMakeLists.txt").write_text("# something else\n")
    git("commit", "-qam", "later", cwd=repo)
    return repo, pinned, git("rev-parse", "HEAD", cwd=repo)


def git_spec(repo: Path, commit: str) -> BackendSpec:
    return BackendSpec(
        name="g", kind="harness", source=SourceSpec(type="git", url=str(repo), commit=commit, submodules=False)
    )


def test_git_checkout_that_lands_elsewhere_is_refused(
    tmp_path: Path, upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A post-checkout hook (from the user's global git config: core.hooksPath) moves HEAD off the pin."""
    repo, pinned, later = upstream
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    hook = hooks / "post-checkout"
    hook.write_text(f'#!/bin/sh\n[ -n "$MOVED" ] && exit 0\nMOVED=1 exec git checkout -q --detach {later}\n')
    hook.chmod(0o755)
    gitconfig = tmp_path / "gitconfig"
    gitconfig.write_text(f"[core]\n\thooksPath = {hooks}\n")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(gitconfig))
    cache, log = tmp_path / "cache", tmp_path / "fetch.log"
    with pytest.raises(BackendFailure) as ei:
        ensure_source(git_spec(repo, pinned), cache, log, **FETCH)
    f = ei.value
    assert f.code == 2 and f.kind == "bad_source" and f.phase == "checkout"
    assert f"is at {later}, not at the pinned commit {pinned}" in f.message
    assert list((cache / "sources").iterdir()) == []  # the moved checkout is not kept


def test_a_cached_checkout_moved_off_the_pin_is_refused(tmp_path: Path, upstream) -> None:
    repo, pinned, later = upstream
    cache, log = tmp_path / "cache", tmp_path / "fetch.log"
    src = ensure_source(git_spec(repo, pinned), cache, log, **FETCH)
    assert (src / "CMakeLists.txt").read_text() == "# pinned\n"
    assert ensure_source(git_spec(repo, pinned), cache, log, **FETCH) == src  # reused as it is
    git("checkout", "-q", "--detach", later, cwd=src)  # the cache tampered with
    with pytest.raises(BackendFailure) as ei:
        ensure_source(git_spec(repo, pinned), cache, log, **FETCH)
    assert ei.value.code == 2 and ei.value.phase == "checkout" and str(src.parent) in ei.value.hint


# ============================================================================ (c) sdists by hash


def tarball(path: Path, top: str, files: dict[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_a_tampered_archive_of_a_builtin_sdist_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tarball(tmp_path / "sdists/llama_cpp_python-0.3.1.tar.gz", "llama_cpp_python-0.3.1", {"CMakeLists.txt": ""})
    monkeypatch.setenv(ENV_SDIST_DIR, str(fake.parent))
    cache, log = tmp_path / "cache", tmp_path / "fetch.log"
    with pytest.raises(BackendFailure) as ei:
        ensure_source(BUILTIN_SPECS["llama-2024"], cache, log, **FETCH)
    f = ei.value
    assert f.code == 2 and f.kind == "bad_source" and f.phase == "checksum"
    assert sha256_file(fake) in f.message and SDIST_SHA256["llama-cpp-python==0.3.1"] in f.message
    assert list((cache / "sources").iterdir()) == []  # nothing extracted


def test_the_cached_pypi_sdists_match_their_pins(tmp_path: Path) -> None:
    dirs = [Path(d) for d in SDIST_DIRS.split(os.pathsep) if d]
    found = [(req, d / f"llama_cpp_python-{req.split('==')[1]}.tar.gz") for req in SDIST_SHA256 for d in dirs]
    found = [(req, p) for req, p in found if p.is_file()]
    if not found:
        pytest.skip(f"no cached llama-cpp-python sdist in ${ENV_SDIST_DIR}")
    for req, archive in found:
        assert verify_sdist(archive, req, SDIST_SHA256[req], tmp_path / "v.log") == SDIST_SHA256[req]


def test_a_pinned_sha256_in_config_is_enforced_and_a_stale_extraction_refetched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tarball(tmp_path / "sdists/toy_engine-1.0.tar.gz", "toy_engine-1.0", {"CMakeLists.txt": "# toy\n"})
    monkeypatch.setenv(ENV_SDIST_DIR, str(archive.parent))
    cache, log = tmp_path / "cache", tmp_path / "fetch.log"

    def spec(sha: str) -> BackendSpec:
        src = {"type": "sdist", "requirement": "toy-engine==1.0", "sha256": sha}
        return spec_from_config("toy", {"kind": "harness", "source": src})

    with pytest.raises(BackendFailure) as ei:
        ensure_source(spec("0" * 64), cache, log, **FETCH)
    assert ei.value.code == 2 and ei.value.phase == "checksum"
    right = sha256_file(archive)
    tree = ensure_source(spec(right), cache, log, **FETCH)
    assert json.loads((tree / SOURCE_META).read_text())["sdist_sha256"] == right
    (tree / SOURCE_META).write_text(json.dumps({"sdist_sha256": "1" * 64}))  # extracted from another archive
    (tree / "CMakeLists.txt").write_text("# altered\n")
    tree = ensure_source(spec(right), cache, log, **FETCH)
    assert (tree / "CMakeLists.txt").read_text() == "# toy\n"
    assert json.loads((tree / SOURCE_META).read_text())["sdist_sha256"] == right


# ============================================================================ (d) no repair under CI unless asked


def test_under_ci_repair_runs_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    program = tmp_path / "bin" / "engine"
    wrapper = tmp_path / "engine.in"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{TOY}" "$@"\n')
    wrapper.chmod(0o755)
    build = [["mkdir", "-p", str(program.parent)], ["cp", str(wrapper), str(program)]]
    config = {"backends": {"toy": {"kind": "command", "command": [str(program)], "build": build}}}
    monkeypatch.setenv("CI", "true")
    kw = {"log_path": tmp_path / "toy.log", "cache_dir": tmp_path / "cache", "config": config}
    with pytest.raises(BackendFailure) as ei:
        provision_lane("toy", **kw)
    f = ei.value
    assert f.code == 2 and "repair is disabled (CI environment detected: CI is set)" in f.message
    assert not program.exists()  # nothing was built
    record = provision_lane("toy", repair="auto", **kw)  # asked for, in config (repair: auto)
    assert program.is_file() and record["repair"] == {"mode": "auto", "why": "set in config (repair:)"}
    assert record["identity"]["binary_sha256"] == sha256_file(program)
