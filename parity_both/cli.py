"""`parity-both`: the seed's command, running the same Snakemake workflow.

It writes a complete config, runs the workflow and prints the workflow's own summary
(results/summary.{json,txt}, or summary.failed.{json,txt} when a job failed), so it never disagrees
with `snakemake results/summary.json`. stdout carries only that summary in the requested format;
progress, failure paragraphs and diagnostics go to stderr.
`parity-both lane-check --backend NAME [--config CFG]` checks a lane program against the lane
protocol instead (parity_both/lanecheck.py; exit 0 only if every rule passes).
`parity-both show RECEIPT...` prints receipts of any schema version in the summary layouts.
`parity-both diff OLD NEW` lists the receipt fields that moved between two results folders.
Every exit prints one document on stdout; with --format json a run that failed before any receipt
has an `error` object (kind, message, log, fix). Each run has a run id (run.json, summary `run`) and
first retires the previous run's receipt copies and summaries in --out-dir (README "Reusing an --out-dir").
Exit codes: 0 all lanes pass; 1 a lane fails its thresholds; 2 token mismatch, inconsistent
tokenizer, bad arguments or unusable input; 3 network unreachable; 4 permission denied; 5 backend
configure/compile failure; 6 nested repair (a repair that started a repair).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from parity_both.jobs import process_alive
from parity_both.tokenize.templates import TEMPLATES

REPO = Path(__file__).resolve().parent.parent
METRIC_CHOICES = ("cos", "mse", "kl", "topk", "greedy")
TEMPLATE_CHOICES = ("auto", *TEMPLATES)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="parity-both",
        description="Compare llama.cpp-family lanes with the NumPy reference, token for token and logit for logit.",
    )
    p.add_argument(
        "--model-gguf", default="embedded", help="GGUF model (default: the embedded SmolLM2-135M-Instruct Q4_1)"
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="external tokenizer.json (default: one beside the GGUF, else the GGUF's own vocabulary)",
    )
    p.add_argument("--prompt", default="What is 2+2?", help="input prompt (default: %(default)r)")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=4,
        help="tokens the reference generates greedily after the prompt; they join the compared sequence",
    )
    p.add_argument(
        "--cos-tol",
        type=float,
        default=None,
        help="per-position cosine threshold of the quantized verdict (default: the reference mode's "
        "thresholds in schemas/config.schema.yaml; the graph verdict has its own)",
    )
    p.add_argument("--out-dir", default="ci", help="where receipt_<lane>.json and the workflow's results go")
    p.add_argument("--format", choices=("text", "json"), default="text", help="summary format on stdout")
    p.add_argument("--prompt-template", choices=TEMPLATE_CHOICES, default="auto")
    p.add_argument("--system-prompt", default=None, help="system prompt for chat templates")
    p.add_argument("--lanes", default=None, help="comma-separated lanes (default: config.yaml's lanes)")
    p.add_argument(
        "--truncate-prompt",
        action="store_true",
        help="cut a prompt longer than the model's context (minus --max-tokens) to fit, instead of refusing it",
    )
    p.add_argument("--no-repair", action="store_true", help="never build or install a missing backend")
    p.add_argument(
        "--diagnose",
        action="store_true",
        help="capture every graph node of every lane and localize departures (also automatic on a failure)",
    )
    p.add_argument("--verbose", action="store_true", help="stream the workflow's progress to stderr")
    p.add_argument("--dump-ids", action="store_true", help="print the reference token ids with pieces to stderr")
    p.add_argument(
        "--dump-cpp-ids",
        action="store_true",
        help="print each lane's own token ids beside the reference's to stderr, marking the first divergence",
    )
    p.add_argument(
        "--metrics",
        default="cos,mse,kl,topk,greedy",
        help="metric families that gate pass/fail: cos,mse,kl,topk,greedy (all are always recorded)",
    )
    p.add_argument("--cores", type=int, default=2, help="parallel jobs (default 2)")
    p.add_argument(
        "--config", default=None, help="YAML merged over config.yaml (lanes, backends, reference, thresholds, gates)"
    )
    args = p.parse_args(argv)
    fams = [m.strip() for m in args.metrics.split(",") if m.strip()]
    bad = [m for m in fams if m not in METRIC_CHOICES]
    if bad or not fams:
        p.error(f"--metrics: unknown family {','.join(bad) or '(empty)'}; choose from {','.join(METRIC_CHOICES)}")
    args.metric_families = fams
    if args.max_tokens < 0:
        p.error("--max-tokens must be >= 0")
    if args.cos_tol is not None and not 0.0 <= args.cos_tol <= 1.0:
        p.error("--cos-tol must be between 0 and 1")
    if args.cores < 1:
        p.error("--cores must be >= 1")
    return args


def fail(msg: str, code: int = 2) -> int:
    print(f"parity-both: error: {msg}", file=sys.stderr)
    return code


def preflight_inputs(args: argparse.Namespace) -> str | None:
    """Check the model and tokenizer before anything is written: one clear line if unusable."""
    from parity_both.config import ConfigError, embedded_model_path
    from parity_both.gguf.reader import GGUFError, read_gguf

    try:
        model = embedded_model_path() if args.model_gguf == "embedded" else args.model_gguf
    except ConfigError as e:
        return str(e)
    if not Path(model).is_file():
        return f"--model-gguf {model}: no such file"
    try:
        read_gguf(model)
    except GGUFError as e:
        return f"--model-gguf: {e}"
    from parity_both.gguf.constants import reference_refusal
    from parity_both.gguf.peek import peek_format

    refusal = reference_refusal(*peek_format(model))
    if refusal is not None:
        return f"--model-gguf {Path(model).name}: {refusal}"
    if args.config:
        c = Path(args.config)
        if not c.is_file():
            return f"--config {c}: no such file"
        try:
            if not isinstance(yaml.safe_load(c.read_text()) or {}, dict):
                return f"--config {c}: must be a YAML mapping (keys of config.yaml)"
        except yaml.YAMLError as e:
            return f"--config {c}: not valid YAML ({str(e).splitlines()[0]})"
    if args.tokenizer:
        t = Path(args.tokenizer)
        if not t.is_file():
            return f"--tokenizer {t}: no such file"
        try:
            tok = json.loads(t.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            return f"--tokenizer {t}: not a JSON tokenizer file ({e.__class__.__name__}); pass a HF tokenizer.json"
        if not isinstance(tok, dict) or not isinstance(tok.get("model"), dict):
            return f"--tokenizer {t}: not a JSON tokenizer file (no 'model' object); pass a HF tokenizer.json"
    return preflight_prompt(args)


def preflight_prompt(args: argparse.Namespace) -> str | None:
    """The prompt and system prompt: UTF-8 text, the prompt not empty."""
    for flag, text in (("--prompt", args.prompt), ("--system-prompt", args.system_prompt)):
        try:
            (text or "").encode("utf-8")
        except UnicodeEncodeError:
            return f"{flag} is not valid UTF-8 text; pass the prompt in UTF-8"
    if not args.prompt.strip():
        return "--prompt is empty; give it some text"
    return None


def build_config(args: argparse.Namespace) -> dict[str, Any]:
    """The complete config of this run, defaults filled from the schema; ConfigError if invalid."""
    from parity_both.config import with_defaults

    base = yaml.safe_load((REPO / "config.yaml").read_text())
    if args.config:
        extra = yaml.safe_load(Path(args.config).read_text()) or {}
        for key in ("models", "prompts", "max_tokens", "out_dir", "standalone"):
            extra.pop(key, None)  # the command's own flags decide these
        base.update(extra)
    model = args.model_gguf if args.model_gguf == "embedded" else str(Path(args.model_gguf).resolve())
    base.update(
        {
            "standalone": True,
            "models": {
                "model": {"gguf": model, "tokenizer": str(Path(args.tokenizer).resolve()) if args.tokenizer else None}
            },
            "prompts": {
                "prompt": {"text": args.prompt, "template": args.prompt_template, "system_prompt": args.system_prompt}
            },
            "max_tokens": args.max_tokens,
            "metrics": args.metric_families,
            "out_dir": "results",
        }
    )
    if args.lanes:
        base["lanes"] = [s.strip() for s in args.lanes.split(",")]
    if args.no_repair:
        base["repair"] = "never"
    if args.diagnose:
        base["diagnose"] = True
    if args.truncate_prompt:
        base["truncate_prompt"] = True
    cfg = with_defaults(base)
    if args.cos_tol is not None:
        cfg["thresholds"][cfg["reference"]["mode"]]["cos_tol"] = args.cos_tol
    return cfg


def snakemake_cmd(cfg_path: Path, out_dir: Path, cores: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(out_dir),
        "--configfile",
        str(cfg_path),
        "--profile",
        str(REPO / "profiles" / "default"),
        "--cores",
        str(cores),
        *extra,
    ]


PID_FILE = ".parity-both.snakemake.pid"  # the Snakemake process this command started, while it runs


def run_workflow(cfg_path: Path, out_dir: Path, args: argparse.Namespace) -> int:
    log_path = out_dir / "workflow.log"
    cmd = snakemake_cmd(cfg_path, out_dir, args.cores, "results/summary.json")
    env = dict(os.environ)
    with open(log_path, "w") as log:
        if args.verbose:
            print(f"parity-both: running {' '.join(cmd)}", file=sys.stderr)
        out = subprocess.PIPE if args.verbose else log
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, text=True)
        (out_dir / PID_FILE).write_text(f"{proc.pid}\n")
        if args.verbose:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                sys.stderr.write(line)
        rc = proc.wait()
    (out_dir / PID_FILE).unlink(missing_ok=True)
    return rc


def clear_stale_lock(out_dir: Path, cores: int) -> bool:
    """True if Snakemake's lock on out_dir was left by a run of this command that was killed (its
    Snakemake process is gone): the lock is removed (`snakemake --unlock`) so this run can proceed."""
    pid_file, cfg_path = out_dir / PID_FILE, out_dir / "parity-config.yaml"
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return False  # the lock is not ours: a plain `snakemake` run holds it
    if process_alive(pid):
        return False  # still running (the killed command's Snakemake outlived it)
    proc = subprocess.run(snakemake_cmd(cfg_path, out_dir, cores, "--unlock"), capture_output=True, text=True)
    pid_file.unlink(missing_ok=True)
    if proc.returncode == 0:
        print(f"parity-both: removed the lock of an interrupted run in {out_dir}", file=sys.stderr)
    return proc.returncode == 0


def run_summary(results: Path, rc: int, lanes: list[str], log: Path) -> tuple[dict[str, Any], str]:
    """(summary, text) the workflow wrote for this run: summary.{json,txt} when it succeeded,
    summary.failed.{json,txt} when a job failed (the command removed both before the run, so either
    is this run's). A run that failed before any job gets an error summary: exit code 2."""
    name = "summary" if rc == 0 else "summary.failed"
    path = results / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text()), path.with_suffix(".txt").read_text()
    kind, message = workflow_failure(log)
    summary = error_summary(kind, message, 2, lanes, log=str(log))
    return summary, render_error(summary)


def workflow_failure(log: Path) -> tuple[str, str]:
    """(kind, one line) of a workflow that failed before any job: Snakemake's lock, or its own error."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    if "LockException" in text or "Directory cannot be locked" in text:
        return "busy", f"{log.parent} is locked by another run (Snakemake's lock); wait for it or use another --out-dir"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    err = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
    return "workflow", f"the workflow failed before any job ran: {err[:300]}"


def error_summary(
    kind: str, message: str, code: int, lanes: list[str], log: str | None = None, run_id: str | None = None
) -> dict[str, Any]:
    """The summary of a run that failed before any receipt: no receipt, `error` says why."""
    from parity_both.summary import DEFAULT_FIX, build_summary

    summary = build_summary([], errors=[], lanes=lanes)
    summary["overall"]["exit_code"] = code
    summary["error"] = {"kind": kind, "message": message, "log": log, "fix": DEFAULT_FIX.get(kind), "rule": None}
    summary["run"] = {"id": run_id}
    return summary


def render_error(summary: dict[str, Any]) -> str:
    e = summary["error"]
    return (
        f"parity-both: {e['kind']}: {e['message']}\n  fix: {e['fix']}\n  exit code: {summary['overall']['exit_code']}\n"
    )


def retire_previous_run(out_dir: Path) -> None:
    """Nothing of an earlier run can be reported as this one's: its receipt copies, run record and
    workflow summaries go (Snakemake reruns the cheap summary rule; cached job outputs stay)."""
    for old in out_dir.glob("receipt_*.json"):
        old.unlink()
    (out_dir / "run.json").unlink(missing_ok=True)
    for name in ("summary.json", "summary.txt", "summary.failed.json", "summary.failed.txt"):
        (out_dir / "results" / name).unlink(missing_ok=True)


def copy_receipts(summary: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """receipt_<lane>.json beside the results: this run's receipts (those its summary lists) only."""
    copies = {}
    for m in summary["models"].values():
        for lane, entry in m["lanes"].items():
            for p in entry["prompts"].values():
                shutil.copyfile(out_dir / p["receipt_path"], out_dir / f"receipt_{lane}.json")
                copies[f"receipt_{lane}.json"] = p["receipt_path"]
    return copies


def write_run_record(out_dir: Path, run_id: str, summary: dict[str, Any], copies: dict[str, str]) -> None:
    """run.json: which run wrote the receipt copies beside it (the id is never inside a receipt)."""
    rec = {
        "run_id": run_id,
        "exit_code": summary["overall"]["exit_code"],
        "receipts": {
            name: {"source": src, "sha256": hashlib.sha256((out_dir / name).read_bytes()).hexdigest()}
            for name, src in copies.items()
        },
    }
    tmp = out_dir / ".run.json.tmp"
    tmp.write_text(json.dumps(rec, sort_keys=True, indent=2) + "\n")
    os.replace(tmp, out_dir / "run.json")


def dump_ids(results: Path, lanes: list[str], ref: bool, cpp: bool) -> None:
    from parity_both.tokenize.authority import dump_ids_table

    prompt_json = results / "model" / "prompts" / "prompt.json"
    if not prompt_json.is_file():
        return
    rec = json.loads(prompt_json.read_text())
    if ref:
        print(
            f"reference token ids ({len(rec['ids'])}, template {rec['template']['used']}, contract "
            f"{json.dumps(rec['contract'], sort_keys=True)}):",
            file=sys.stderr,
        )
        for i, (t, piece) in enumerate(zip(rec["ids"], rec["pieces"], strict=True)):
            print(f"  {i:4d} {t:8d} {piece!r}", file=sys.stderr)
    if cpp:
        import numpy as np

        for lane in lanes:
            npz = results / "model" / "lanes" / lane / "prompt.npz"
            if not npz.is_file():
                print(f"{lane}: no lane tokenization (the lane did not run)", file=sys.stderr)
                continue
            with np.load(npz, allow_pickle=False) as z:
                lane_ids = [int(i) for i in z["lane_ids"]]
                parity = json.loads(str(z["token_parity"]))
                lane_pieces = json.loads(str(z["lane_pieces"]))
            print(f"{lane} token ids vs reference ({'match' if parity['match'] else 'MISMATCH'}):", file=sys.stderr)
            print(dump_ids_table(rec["ids"], rec["pieces"], lane_ids, lane_pieces), file=sys.stderr)


def show(argv: list[str]) -> int:
    """Print receipts (schema v1, v2 or v3; older ones upgraded and marked so) as one summary."""
    from parity_both.receipt import load_receipt
    from parity_both.summary import build_summary, render_text

    p = argparse.ArgumentParser(prog="parity-both show", description="print receipts in the summary layouts")
    p.add_argument("receipts", nargs="+", help="receipt JSON files (schema v1, v2 or v3)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    args = p.parse_args(argv)
    receipts = []
    for path in args.receipts:
        try:
            r = load_receipt(path)
        except (OSError, ValueError) as e:
            return fail(f"{path}: {e.strerror if isinstance(e, OSError) else e}")
        r["_path"] = str(path)
        receipts.append(r)
    summary = build_summary(receipts)
    upgraded = sorted({f"v{r['upgraded_from_version']}" for r in receipts if r.get("upgraded_from_version")})
    text = render_text(summary)
    if upgraded:
        text += f"(upgraded from receipt schema {', '.join(upgraded)} to v3 for display)\n"
    return emit(summary, text, args.format)


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(4)}"


def wants_json(argv: list[str]) -> bool:
    return any(
        a == "--format=json" or (a == "--format" and b == "json") for a, b in zip(argv, [*argv[1:], ""], strict=True)
    )


def emit(summary: dict[str, Any], text: str, fmt: str) -> int:
    """Exactly one document on stdout (JSON or text); the summary's exit code."""
    sys.stdout.write(json.dumps(summary, sort_keys=True, indent=2) + "\n" if fmt == "json" else text)
    return int(summary["overall"]["exit_code"])


def early_exit(kind: str, msg: str, fmt: str, run_id: str, code: int = 2, out_dir: Path | None = None) -> int:
    """A run that stops before the workflow: one line on stderr; with --format json, one JSON document;
    out_dir (a used folder this run holds): its run.json says this run failed, with no receipt."""
    fail(msg, code)
    summary = error_summary(kind, msg, code, [], run_id=run_id)
    if out_dir is not None:
        write_run_record(out_dir, run_id, summary, {})
    if fmt == "json":
        emit(summary, "", fmt)
    return code


def snakemake_lock_line(out_dir: Path) -> str | None:
    """One line if Snakemake's own lock is on out_dir (a plain `snakemake` run there, or a killed one)."""
    locks = out_dir / ".snakemake" / "locks"
    if locks.is_dir() and any(locks.iterdir()):
        return (
            f"{out_dir} is locked by another Snakemake run (Snakemake's lock); wait for it, or if none is "
            f"running, run: snakemake --unlock --directory {out_dir} --snakefile {REPO / 'Snakefile'} "
            f"--configfile {out_dir / 'parity-config.yaml'}"
        )
    return None


def lock_out_dir(out_dir: Path) -> Any:
    """An exclusive lock on out_dir for this command (None if another run holds it)."""
    import fcntl

    fh = open(out_dir / ".parity-both.lock", "a")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    return fh


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lane-check"]:  # `parity-both lane-check --backend NAME`: docs/lane-protocol.md
        from parity_both import lanecheck

        return lanecheck.main(argv[1:])
    if argv[:1] == ["show"]:  # `parity-both show RECEIPT...`: any receipt version in the text layout
        return show(argv[1:])
    if argv[:1] == ["diff"]:  # `parity-both diff OLD NEW`: which receipt fields moved between two runs
        from parity_both import receiptdiff

        return receiptdiff.main(argv[1:])
    run_id = new_run_id()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parse_args(argv)
    except SystemExit as e:  # argparse's usage error: its one line on stderr, and the JSON document
        if not e.code:
            raise
        msg = next((ln for ln in reversed(err.getvalue().splitlines()) if ln.startswith("parity-both: error:")), "")
        msg = msg.removeprefix("parity-both: error: ") or "invalid arguments"
        fmt = "json" if wants_json(argv) else "text"
        return early_exit("bad_arguments", f"invalid arguments: {msg} (see parity-both --help)", fmt, run_id)
    try:
        return run(args, run_id)
    except OSError as e:  # the output folder (or a file in it) cannot be written
        code = 4 if isinstance(e, PermissionError) else 2
        where = e.filename or args.out_dir
        return early_exit("output", f"--out-dir: cannot write {where}: {e.strerror}", args.format, run_id, code)


def run(args: argparse.Namespace, run_id: str) -> int:
    from parity_both.config import ConfigError

    out_dir = Path(args.out_dir).resolve()
    problem = preflight_inputs(args)
    if problem is None:
        try:
            cfg = build_config(args)
        except ConfigError as e:
            problem = str(e)
    lock = None
    if problem is not None or out_dir.is_dir():  # an unusable input writes nothing; a used folder is retired
        if out_dir.is_dir():
            lock = lock_out_dir(out_dir)
            if lock is None:
                return early_exit(
                    "busy",
                    f"another parity-both run is using {out_dir}; wait or use another --out-dir",
                    args.format,
                    run_id,
                )
            busy = snakemake_lock_line(out_dir)
            if busy is not None and clear_stale_lock(out_dir, args.cores):
                busy = None
            if busy is not None:
                return early_exit("busy", busy, args.format, run_id)
            retire_previous_run(out_dir)
        if problem is not None:
            return early_exit("bad_input", problem, args.format, run_id, out_dir=out_dir if lock else None)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = lock or lock_out_dir(out_dir)
    if lock is None:
        return early_exit(
            "busy", f"another parity-both run is using {out_dir}; wait or use another --out-dir", args.format, run_id
        )
    cfg_path = out_dir / "parity-config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=True))
    os.environ["PARITY_BOTH_RUN_ID"] = run_id
    rc = run_workflow(cfg_path, out_dir, args)
    summary, text = run_summary(out_dir / "results", rc, cfg["lanes"], out_dir / "workflow.log")
    summary.setdefault("run", {})["id"] = run_id
    write_run_record(out_dir, run_id, summary, copy_receipts(summary, out_dir))
    if args.dump_ids or args.dump_cpp_ids:
        dump_ids(out_dir / "results", cfg["lanes"], args.dump_ids, args.dump_cpp_ids)
    for record in summary.get("errors") or []:
        print(failure_paragraph(record, out_dir), file=sys.stderr)
    for line in verdict_lines(summary):
        print(line, file=sys.stderr)
    if "error" in summary and not summary.get("errors"):
        print(f"parity-both: error: {summary['error']['message']}; see {out_dir / 'workflow.log'}", file=sys.stderr)
    return emit(summary, text, args.format)


def verdict_lines(summary: dict[str, Any]) -> list[str]:
    """One line per lane whose receipt failed (the failure paragraphs cover jobs that did not finish)."""
    lines = []
    for name, m in summary["models"].items():
        for lane, e in m["lanes"].items():
            if not e["passed"]:
                why = next((f for p in e["prompts"].values() for f in p["failures"]), "")
                lines.append(f"parity-both: {name}/{lane}: {e['status']}: {why}")
    return lines


def failure_paragraph(rec: dict[str, Any], workdir: Path) -> str:
    """What failed, how to fix it, and its log (paths in records are relative to the workflow's directory)."""
    wildcards = rec.get("wildcards") or {}
    parts = [
        f"parity-both: {rec.get('kind', 'failure')} in rule {rec.get('rule')}"
        + (f" ({', '.join(f'{k}={v}' for k, v in wildcards.items())})" if wildcards else "")
        + f": {rec.get('message')}"
    ]
    if rec.get("hint"):
        parts.append(f"  fix: {rec['hint']}")
    log = rec.get("log")
    parts.append(f"  log: {workdir / log if log else None}")
    if rec.get("build_log"):
        parts.append(f"  build log: {rec['build_log']}")
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
