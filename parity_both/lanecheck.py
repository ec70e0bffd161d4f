"""``parity-both lane-check``: run a lane program through the lane protocol (docs/lane-protocol.md) on the
embedded model with generated inputs, and say which rules it keeps.

    parity-both lane-check --backend NAME [--config CFG] [--model GGUF]

Every request is a real process; every status line is validated against schemas/lane-status.schema.json.
The table lists one line per rule; exit status 0 only if every rule passes (1 otherwise, 2 for
unusable arguments or a backend that cannot be provisioned).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from parity_both.lanes.command import PROTOCOL_VERSION, status_errors
from parity_both.provision.harness import ProgramResult, run_program

LONG_TEXT = (
    "Parity means the same numbers from the same inputs. Größe, naïve café, 東京, emoji 🙂, tabs\tand\n"
    "newlines, code: def f(x): return x**2 # 12345 67890. "
) * 24
SENTENCE = "The capital of France is Paris, and the capital of Italy is Rome."
KINDS = ("unknown", "unused", "normal", "control", "user_defined", "byte", "undefined")


@dataclass
class Rule:
    name: str
    ok: bool
    detail: str


class Checker:
    """Runs the requests and records one Rule per protocol rule checked."""

    def __init__(self, command: Sequence[str], model: str, workdir: Path, timeout: float = 600.0) -> None:
        self.command, self.model, self.dir, self.timeout = list(command), model, workdir, timeout
        self.rules: list[Rule] = []
        self.status_problems: list[str] = []
        self.n_requests = 0

    def rule(self, name: str, ok: bool, detail: str) -> bool:
        self.rules.append(Rule(name, bool(ok), detail))
        return bool(ok)

    def request(self, *args: str) -> ProgramResult:
        """One request; its status line is checked here (one JSON line, schema, exit_code == status)."""
        res = run_program([*self.command, *args], timeout=self.timeout)
        self.n_requests += 1
        what = " ".join(args[:1]) or "(no subcommand)"
        if len(res.lines) != 1 or res.status is None:
            self.status_problems.append(f"{what}: stdout held {len(res.lines)} line(s), not one JSON object")
        else:
            errs = status_errors(res.status)
            if errs:
                self.status_problems.append(f"{what}: status line breaks the schema: {errs[0]}")
            if res.status.get("exit_code") != res.returncode:
                self.status_problems.append(
                    f"{what}: status exit_code {res.status.get('exit_code')} != process exit status {res.returncode}"
                )
        return res

    def write(self, name: str, data: bytes) -> str:
        p = self.dir / name
        p.write_bytes(data)
        return str(p)

    def tokenize(self, text: str, parse_special: bool) -> ProgramResult:
        f = self.write("text.txt", text.encode("utf-8"))
        return self.request(
            "tokenize",
            "--model",
            self.model,
            "--text-file",
            f,
            "--add-special",
            "0",
            "--parse-special",
            str(int(parse_special)),
        )

    def eval(self, ids: Sequence[int], out: str = "logits.f32") -> tuple[ProgramResult, np.ndarray | None]:
        f = self.write("ids.i32", np.asarray(ids, dtype="<i4").tobytes())
        path = self.dir / out
        path.unlink(missing_ok=True)
        res = self.request(
            "eval",
            "--model",
            self.model,
            "--ids-file",
            f,
            "--out",
            str(path),
            "--threads",
            "2",
            "--n-ctx",
            str(max(64, len(ids))),
            "--type-k",
            "f32",
            "--type-v",
            "f32",
        )
        data = np.fromfile(path, dtype="<f4") if res.returncode == 0 and path.is_file() else None
        return res, data


def expect_exit(c: Checker, name: str, code: int, args: Sequence[str], why: str) -> None:
    res = c.request(*args)
    ok = res.returncode == code and (res.status or {}).get("ok") is False
    got = f"exit {res.returncode}" + (f", stage {res.status.get('stage')}" if res.status else ", no status line")
    c.rule(name, ok, f"{why}: want exit {code} with ok=false; got {got}")


def check_info(c: Checker) -> dict[str, Any]:
    a, b = c.request("info"), c.request("info")
    st = a.status or {}
    c.rule("info-ok", a.returncode == 0 and st.get("ok") is True, f"`info` exits 0 with ok=true (exit {a.returncode})")
    c.rule(
        "info-protocol",
        st.get("protocol") == PROTOCOL_VERSION,
        f'`info` reports "protocol": {PROTOCOL_VERSION} (got {st.get("protocol")!r})',
    )
    c.rule("info-deterministic", a.stdout == b.stdout, "two `info` runs print the same line (it is the probe stamp)")
    return st


def check_malformed(c: Checker, n_vocab: int) -> None:
    expect_exit(c, "usage-unknown-command", 1, ["frobnicate"], "an unknown subcommand is a usage error")
    expect_exit(c, "usage-missing-option", 1, ["eval", "--model", c.model], "eval without --ids-file/--out")
    expect_exit(
        c, "usage-dangling-option", 1, ["tokenize", "--model", c.model, "--text-file"], "an option without its value"
    )
    expect_exit(
        c,
        "bad-input-model",
        2,
        ["vocab", "--model", str(c.dir / "missing.gguf"), "--out", str(c.dir / "v.tsv")],
        "a model file that does not exist",
    )
    expect_exit(
        c,
        "bad-input-ids-file",
        2,
        ["eval", "--model", c.model, "--ids-file", c.write("bad.i32", b"\1\2\3"), "--out", str(c.dir / "x.f32")],
        "an ids file of 3 bytes",
    )
    expect_exit(
        c,
        "bad-input-token-id",
        2,
        [
            "eval",
            "--model",
            c.model,
            "--ids-file",
            c.write("oob.i32", np.asarray([1, n_vocab], "<i4").tobytes()),
            "--out",
            str(c.dir / "x.f32"),
        ],
        f"token id {n_vocab} (= n_vocab)",
    )


def check_vocab(c: Checker) -> tuple[int, list[tuple[int, str, bytes]], dict[str, Any]]:
    out = c.dir / "vocab.tsv"
    res = c.request("vocab", "--model", c.model, "--out", str(out))
    st = res.status or {}
    rows: list[tuple[int, str, bytes]] = []
    problem = None if res.returncode == 0 and out.is_file() else f"exit {res.returncode}, no vocab file"
    if problem is None:
        for n, line in enumerate(out.read_bytes().split(b"\n")[:-1]):
            f = line.split(b"\t")
            try:
                assert len(f) == 5, f"{len(f)} fields"
                assert int(f[0]) == n, f"id {int(f[0])} on line {n}"
                int(f[1])
                assert f[2].decode() in KINDS, f"kind {f[2].decode()!r}"
                rows.append((n, f[2].decode(), bytes.fromhex(f[3].decode())))
                bytes.fromhex(f[4].decode())
            except (AssertionError, ValueError) as e:
                problem = f"line {n + 1}: {e}"
                break
    if problem is None and st.get("n_vocab") != len(rows):
        problem = f"status n_vocab {st.get('n_vocab')} != {len(rows)} rows"
    for k in ("bos_id", "eos_id"):
        if problem is None and not -1 <= int(st.get(k, -2)) < len(rows):
            problem = f"{k} {st.get(k)} outside [-1, n_vocab)"
    c.rule(
        "vocab-tsv",
        problem is None,
        "vocab TSV: id, attr, kind, hex text, hex piece; ids 0..n-1"
        + (f" ({problem})" if problem else f" ({len(rows)} tokens)"),
    )
    return len(rows), rows, st


def check_tokenize(c: Checker, n_vocab: int, rows: list[tuple[int, str, bytes]]) -> list[int]:
    res = c.tokenize("", False)
    c.rule(
        "tokenize-empty",
        res.returncode == 0 and (res.status or {}).get("ids") == [],
        f"empty text gives no ids (got exit {res.returncode}, ids {(res.status or {}).get('ids')!r})",
    )
    a, b = c.tokenize(LONG_TEXT, False), c.tokenize(LONG_TEXT, False)
    ids = (a.status or {}).get("ids") or []
    ok = a.returncode == 0 and 0 < len(ids) and all(0 <= i < n_vocab for i in ids) and a.stdout == b.stdout
    c.rule("tokenize-long", ok, f"{len(LONG_TEXT.encode())}-byte text: ids in range, the same twice ({len(ids)} ids)")
    special = next(((i, t) for i, k, t in rows if k == "control" and len(t) > 1), None)
    if special is None:
        c.rule("tokenize-special", True, "no control token with text in this vocabulary (nothing to check)")
    else:
        sid, text = special
        on = (c.tokenize(text.decode("utf-8", "replace"), True).status or {}).get("ids")
        off = (c.tokenize(text.decode("utf-8", "replace"), False).status or {}).get("ids")
        c.rule(
            "tokenize-special",
            on == [sid] and off != [sid],
            f"control token {text.decode('utf-8', 'replace')!r}: [{sid}] with --parse-special 1 (got {on}), "
            f"plain text with 0 (got {off})",
        )
    return (c.tokenize(SENTENCE, False).status or {}).get("ids") or [1, 2, 3, 4]


def check_eval(c: Checker, n_vocab: int, ids: list[int]) -> None:
    ids = [i for i in ids if 0 <= i < n_vocab][:24] or [0]
    res, a = c.eval(ids, "a.f32")
    st = res.status or {}
    shape_ok = (
        a is not None
        and a.size == len(ids) * n_vocab
        and st.get("n_tokens") == len(ids)
        and st.get("n_vocab") == n_vocab
    )
    c.rule(
        "eval-shape",
        shape_ok,
        f"logits file holds float32 [{len(ids)}, {n_vocab}] row-major "
        f"(got {None if a is None else a.size} values, exit {res.returncode})",
    )
    if not shape_ok or a is None:
        for name in ("eval-finite", "eval-deterministic", "eval-causal"):
            c.rule(name, False, "not checked: eval-shape failed")
        return
    bad = int(np.count_nonzero(~np.isfinite(a)))
    c.rule("eval-finite", bad == 0, f"every logit is finite ({bad} NaN/inf)")
    _, b = c.eval(ids, "b.f32")
    c.rule(
        "eval-deterministic",
        b is not None and np.array_equal(a, b, equal_nan=True),
        "a second eval of the same ids gives bitwise the same logits"
        + ("" if b is None or b.shape != a.shape else f" (max |diff| {float(np.nanmax(np.abs(a - b))):.3g})"),
    )
    k = max(1, len(ids) // 2)
    _, p = c.eval(ids[:k], "p.f32")
    rows_a = a.reshape(len(ids), n_vocab)[:k]
    if p is None or p.size != k * n_vocab:
        c.rule("eval-causal", False, f"eval of the first {k} ids failed or has the wrong shape")
    else:
        p = p.reshape(k, n_vocab)
        both = np.isfinite(p) & np.isfinite(rows_a)  # non-finite values are eval-finite's to judge
        diff, ref = np.where(both, p - rows_a, 0.0), np.where(both, rows_a, 0.0)
        nmse = float(np.sum(diff**2) / max(float(np.sum(ref**2)), 1e-30))
        c.rule(
            "eval-causal",
            nmse < 1e-4,
            f"row i depends on ids[0..i] only: the first {k} rows of a prefix eval match (NMSE {nmse:.2e} < 1e-4)",
        )
    settings = st.get("settings") or {}
    c.rule(
        "eval-settings",
        all(key in settings for key in ("threads", "n_ctx", "n_batch", "type_k", "type_v")),
        f"eval reports the settings it used (threads, n_ctx, n_batch, type_k, type_v): {sorted(settings)}",
    )


def run_checks(command: Sequence[str], model: str, timeout: float = 600.0) -> list[Rule]:
    with tempfile.TemporaryDirectory(prefix="lane-check-") as tmp:
        c = Checker(command, model, Path(tmp), timeout)
        check_info(c)
        n_vocab, rows, _ = check_vocab(c)
        if n_vocab:
            check_malformed(c, n_vocab)
            check_eval(c, n_vocab, check_tokenize(c, n_vocab, rows))
        c.rule(
            "status-lines",
            not c.status_problems,
            f"every request printed one schema-valid JSON line whose exit_code is the exit status "
            f"({c.n_requests} requests)" + (f"; {c.status_problems[0]}" if c.status_problems else ""),
        )
        return c.rules


def render(rules: Sequence[Rule], title: str) -> str:
    width = max(len(r.name) for r in rules)
    lines = [title, f"{'rule'.ljust(width)}  result  what"]
    lines += [f"{r.name.ljust(width)}  {'pass' if r.ok else 'FAIL'}    {r.detail}" for r in rules]
    failed = [r.name for r in rules if not r.ok]
    lines.append(
        f"{len(rules) - len(failed)}/{len(rules)} rules pass" + (f"; broken: {', '.join(failed)}" if failed else "")
    )
    return "\n".join(lines) + "\n"


def backend_command(name: str, config: dict[str, Any]) -> list[str]:
    """The argv of a backend's program (a command lane, or the C++ harness of a harness lane),
    provisioned first when repair allows (a command lane's `build:` steps, a harness build)."""
    from parity_both.hashing import cache_dir
    from parity_both.provision.provision import ensure_backend
    from parity_both.provision.specs import lane_spec

    spec = lane_spec(name, config)
    if spec.kind not in ("command", "harness"):
        raise ValueError(
            f"backend '{name}' is of kind {spec.kind}: lane-check runs lane programs "
            "(kind command, or the C++ harness of a harness lane)"
        )
    log = cache_dir() / "logs" / f"lane-check-{name}.build.log"
    done = ensure_backend(spec, cache_dir(), log, config.get("repair"))
    return list(spec.command) if spec.kind == "command" else [done.identity["harness_path"]]


def load_config(path: str | None) -> dict[str, Any]:
    import yaml

    from parity_both.cli import REPO

    cfg = yaml.safe_load((REPO / "config.yaml").read_text()) or {}
    if path:
        cfg.update(yaml.safe_load(Path(path).read_text()) or {})
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    from parity_both.config import embedded_model_path
    from parity_both.provision.failures import BackendFailure

    ap = argparse.ArgumentParser(prog="parity-both lane-check", description=__doc__.split("\n")[0])
    ap.add_argument("--backend", required=True, help="a backend of kind command (or harness) in config")
    ap.add_argument("--config", default=None, help="YAML merged over config.yaml (its `backends:`)")
    ap.add_argument("--model", default=None, help="GGUF to run on (default: the embedded SmolLM2 Q4_1)")
    a = ap.parse_args(argv)
    try:
        command = backend_command(a.backend, load_config(a.config))
    except (BackendFailure, ValueError, OSError) as e:
        print(f"parity-both lane-check: error: {e}", file=sys.stderr)
        return 2
    model = a.model or embedded_model_path()
    rules = run_checks(command, model)
    title = f"lane-check {a.backend}: {' '.join(command)}\non {Path(model).name}, lane protocol {PROTOCOL_VERSION}"
    sys.stdout.write(render(rules, title))
    return 0 if all(r.ok for r in rules) else 1
