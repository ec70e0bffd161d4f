"""`parity-both`: the seed's command, running the same Snakemake workflow.

stdout carries only the summary in the requested format; progress and diagnostics go to stderr.
Exit codes: 0 all lanes pass; 1 a lane fails its thresholds; 2 token mismatch, inconsistent
tokenizer, bad arguments or unusable input; 3 network unreachable; 4 permission denied; 5 backend
configure/compile failure; 6 recursive repair.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
METRIC_CHOICES = ("cos", "mse", "kl", "topk", "greedy")
TEMPLATE_CHOICES = ("auto", "raw", "instruct", "llama3-chat", "chatml", "gguf")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="parity-both",
        description="Compare llama.cpp-family lanes with the NumPy reference, token for token and logit for logit.")
    p.add_argument("--model-gguf", default="embedded",
                   help="GGUF model (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--tokenizer", default=None,
                   help="external tokenizer.json (default: one beside the GGUF, else the GGUF's own vocabulary)")
    p.add_argument("--prompt", default="What is 2+2?", help="input prompt (default: %(default)r)")
    p.add_argument("--max-tokens", type=int, default=4,
                   help="tokens the reference generates greedily after the prompt; they join the compared sequence")
    p.add_argument("--cos-tol", type=float, default=None, help="per-position cosine threshold (default 0.999)")
    p.add_argument("--out-dir", default="ci", help="where receipt_<lane>.json and the workflow's results go")
    p.add_argument("--format", choices=("text", "json"), default="text", help="summary format on stdout")
    p.add_argument("--prompt-template", choices=TEMPLATE_CHOICES, default="auto")
    p.add_argument("--system-prompt", default=None, help="system prompt for chat templates")
    p.add_argument("--lanes", default=None, help="comma-separated lanes (default: config.yaml's lanes)")
    p.add_argument("--no-repair", action="store_true", help="never build or install a missing backend")
    p.add_argument("--verbose", action="store_true", help="stream the workflow's progress to stderr")
    p.add_argument("--dump-ids", action="store_true", help="print the reference token ids with pieces to stderr")
    p.add_argument("--dump-cpp-ids", action="store_true",
                   help="print each lane's own token ids beside the reference's to stderr, marking the first "
                        "divergence")
    p.add_argument("--metrics", default="cos,mse,kl,topk,greedy",
                   help="metric families that gate pass/fail: cos,mse,kl,topk,greedy (all are always recorded)")
    p.add_argument("--cores", type=int, default=2, help="parallel jobs (default 2)")
    p.add_argument("--config", default=None,
                   help="YAML merged over config.yaml (lanes, backends, reference, thresholds, gates)")
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
            json.loads(t.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            return f"--tokenizer {t}: not a JSON tokenizer file ({e.__class__.__name__}); pass a HF tokenizer.json"
    return None


def build_config(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    base = yaml.safe_load((REPO / "config.yaml").read_text())
    if args.config:
        extra = yaml.safe_load(Path(args.config).read_text()) or {}
        for key in ("models", "prompts", "max_tokens", "out_dir", "standalone"):
            extra.pop(key, None)  # the command's own flags decide these
        base.update(extra)
    lanes = [s.strip() for s in args.lanes.split(",")] if args.lanes else base["lanes"]
    model = args.model_gguf if args.model_gguf == "embedded" else str(Path(args.model_gguf).resolve())
    mode = (base.get("reference") or {}).get("mode", "exact")
    thresholds = base.get("thresholds") or {}
    if args.cos_tol is not None:
        thresholds.setdefault(mode, {})["cos_tol"] = args.cos_tol
    cfg = {
        "standalone": True,
        "models": {"model": {"gguf": model,
                             "tokenizer": str(Path(args.tokenizer).resolve()) if args.tokenizer else None}},
        "prompts": {"prompt": {"text": args.prompt, "template": args.prompt_template,
                               "system_prompt": args.system_prompt}},
        "max_tokens": args.max_tokens,
        "lanes": lanes,
        "threads": base.get("threads", 1),
        "reference": base.get("reference") or {"mode": "exact", "activation": None},
        "thresholds": thresholds,
        "gates": base.get("gates") or [],
        "metrics": args.metric_families,
        "out_dir": "results",
    }
    for key in ("backends", "repair"):
        if key in base:
            cfg[key] = base[key]
    if args.no_repair:
        cfg["repair"] = "never"
    return cfg


def run_workflow(cfg_path: Path, out_dir: Path, args: argparse.Namespace) -> int:
    log_path = out_dir / "workflow.log"
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(out_dir),
           "--configfile", str(cfg_path), "--profile", str(REPO / "profiles" / "default"),
           "--cores", str(args.cores), "results/summary.json"]
    env = dict(os.environ)
    with open(log_path, "w") as log:
        if args.verbose:
            print(f"parity-both: running {' '.join(cmd)}", file=sys.stderr)
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                sys.stderr.write(line)
            return proc.wait()
        return subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def failure_records(results: Path) -> list[dict[str, Any]]:
    recs = []
    for p in sorted((results / "logs").rglob("*.failure.json")) if (results / "logs").is_dir() else []:
        try:
            recs.append(json.loads(p.read_text()))
        except ValueError:
            continue
    return recs


def dump_ids(results: Path, lanes: list[str], ref: bool, cpp: bool) -> None:
    from parity_both.tokenize.authority import dump_ids_table

    prompt_json = results / "model" / "prompts" / "prompt.json"
    if not prompt_json.is_file():
        return
    rec = json.loads(prompt_json.read_text())
    if ref:
        print(f"reference token ids ({len(rec['ids'])}, template {rec['template']['used']}, contract "
              f"{json.dumps(rec['contract'], sort_keys=True)}):", file=sys.stderr)
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = preflight_inputs(args)
    if problem:
        return fail(problem)
    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = build_config(args, out_dir)
    from parity_both.config import ConfigError, validate_config

    try:
        validate_config(cfg)
    except ConfigError as e:
        return fail(str(e))
    cfg_path = out_dir / "parity-config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=True))
    results = out_dir / "results"
    rc = run_workflow(cfg_path, out_dir, args)
    from parity_both.pipeline import make_summary
    from parity_both.summary import render_text

    receipt_paths = sorted(str(p) for p in (results / "model" / "receipts").glob("*/prompt.json"))
    lanes = cfg["lanes"]
    for p in receipt_paths:
        lane = Path(p).parent.name
        shutil.copyfile(p, out_dir / f"receipt_{lane}.json")
    if args.dump_ids or args.dump_cpp_ids:
        dump_ids(results, lanes, args.dump_ids, args.dump_cpp_ids)
    summary = make_summary(receipt_paths) if receipt_paths else None
    if rc != 0:
        recs = failure_records(results)
        code = max((r.get("exit_code", 1) for r in recs), default=1, key=lambda c: (c != 1, c))
        for r in recs:
            for key in ("log", "log_path", "build_log"):  # paths relative to the workflow's directory
                if r.get(key) and not Path(r[key]).is_absolute():
                    r[key] = str(out_dir / r[key])
            print(failure_paragraph(r), file=sys.stderr)
        if not recs:
            print(f"parity-both: the workflow failed; see {out_dir / 'workflow.log'}", file=sys.stderr)
            code = 1 if summary else 2
        if summary is None:
            summary = {"status": "failed", "lanes": {}, "models": {}, "tokenizer_authority": None,
                       "overall": {"both_passed": False, "all_passed": False, "tokenizer_consistent": None,
                                   "exit_code": code, "lanes": lanes, "receipts": 0}}
        summary["errors"] = recs
        for r in recs:  # a lane that could not run is a failed lane, with its reason
            lane = (r.get("wildcards") or {}).get("lane")
            if lane:
                summary["lanes"][lane] = {"status": "error", "exit_code": r.get("exit_code"),
                                          "kind": r.get("kind"), "message": r.get("message"), "models": {}}
        summary["overall"]["both_passed"] = False
        summary["overall"]["exit_code"] = max(code, summary["overall"]["exit_code"])
    if args.format == "json":
        sys.stdout.write(json.dumps(summary, sort_keys=True, indent=2) + "\n")
    else:
        code = summary["overall"]["exit_code"]
        sys.stdout.write(render_text(summary) if summary.get("models") else
                         f"Parity-Both: no lane produced a receipt\nExit code:        {code}\n")
    return int(summary["overall"]["exit_code"])


def failure_paragraph(rec: dict[str, Any]) -> str:
    parts = [f"parity-both: {rec.get('kind', 'failure')} in rule {rec.get('rule')}"
             + (f" ({', '.join(f'{k}={v}' for k, v in rec.get('wildcards', {}).items())})" if rec.get("wildcards")
                else "") + f": {rec.get('message')}"]
    if rec.get("hint"):
        parts.append(f"  fix: {rec['hint']}")
    if rec.get("repair_command"):
        parts.append(f"  repair with: {rec['repair_command']}")
    parts.append(f"  log: {rec.get('log_path') or rec.get('log')}")
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
