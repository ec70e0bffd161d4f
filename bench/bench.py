"""parity-both benchmark: every performance target measured in ONE run, printed as one table.

    python bench/bench.py [--lanes llama,llama-2024] [--smoke] [--json out.json]

Ratios compare commands run here, one after the other, so they are fair on this machine:
P1 reference job vs llama lane job (whole processes, same token sequence); P2 peak RSS of the
reference (embedded model, and a generated bitnet model of a few hundred MB when available); P3 the
lane phase at --cores 2 vs --cores 1; P4 an up-to-date `snakemake results/summary.json` vs
Snakemake's own floor; P5 which jobs a tokenizer.json edit reruns; P6 our SHA-256 vs sha256sum.
Not part of the default test run (a smoke version is: tests/test_bench_smoke.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from conftest import drop_merge_for, jobs_run, snakemake, write_config  # noqa: E402

PY = sys.executable


def timed_child(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MB, exit status) of one child process (os.wait4 gives its own rusage)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if proc.stderr:
        err = proc.stderr.read().decode(errors="replace")
        if os.waitstatus_to_exitcode(status) != 0:
            print(err[-2000:], file=sys.stderr)
    return wall, ru.ru_maxrss / 1024.0, os.waitstatus_to_exitcode(status)


def median_child(cmd: list[str], n: int, env: dict[str, str] | None = None) -> tuple[float, float]:
    runs = [timed_child(cmd, env) for _ in range(n)]
    bad = [r for r in runs if r[2] != 0]
    if bad:
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return statistics.median(r[0] for r in runs), max(r[1] for r in runs)


def row(name: str, measure: str, target: str, ok: bool | None) -> dict[str, Any]:
    return {
        "id": name,
        "measure": measure,
        "target": target,
        "result": "PASS" if ok else ("FAIL" if ok is not None else "n/a"),
    }


def bench(lanes: list[str], smoke: bool, work: Path) -> list[dict[str, Any]]:
    from parity_both.config import embedded_model_path

    model = embedded_model_path()
    reps = 1 if smoke else 3
    import yaml

    base = yaml.safe_load((REPO / "config.yaml").read_text())
    # the pipeline's own prompts and continuation length (config.yaml): the jobs are timed as they run
    # the text prompts (a corpus prompt names a file relative to the repo; the rows below time text prompts)
    prompts = {k: v for k, v in base["prompts"].items() if "corpus" not in v}
    if smoke:  # one prompt (+ code): every row still runs, on the least work that exercises it
        prompts = dict(list(prompts.items())[:1])
    if "code" not in prompts:  # P5b needs a prompt with a piece the others do not use
        prompts["code"] = {"text": "def fibonacci(n):", "template": "raw"}
    tok = work / "tokenizer.json"
    from parity_both.tokenize.authority import build_authority

    build_authority(model, "gguf_embedded", None, str(tok))
    max_tokens = int(base.get("max_tokens", 8))
    smol: dict[str, Any] = {"gguf": "embedded", "tokenizer": str(tok)}
    # --smoke: no twin and no kernel check in the workflow runs (no row times them there: G1 and K1 run
    # the twin and the kernel check on their own; P4 and P5 are about which jobs run, not about these)
    slim: dict[str, Any] = {"kernels": False} if smoke else {}
    if smoke:
        smol["twin"] = "off"
    write_config(
        work,
        {"models": {"smol": smol}, "prompts": prompts, "max_tokens": max_tokens, "lanes": lanes, **slim},
    )
    snakemake(work)
    rows: list[dict[str, Any]] = []

    # P1 / P2: the reference job and the llama lane job as whole processes, same sequence (the
    # prompt whose prompt + greedy continuation is longest).
    import numpy as np

    def seq_len(p: str) -> int:
        with np.load(work / f"results/smol/reference/{p}.npz") as z:
            return len(z["ids"])

    longest = max(prompts, key=seq_len)
    prompt_json = work / f"results/smol/prompts/{longest}.json"
    ref_npz = work / f"results/smol/reference/{longest}.npz"
    backend = work / "results/backends/llama.json"
    prepared = work / "results/smol/reference/prepared"  # the per-model cache target, as the job uses it
    ref_cmd = [
        PY,
        "-c",
        (
            "import os; os.environ.setdefault('OPENBLAS_NUM_THREADS','1'); "
            "from parity_both import pipeline as p; "
            f"p.reference_logits({model!r}, p.read_json({str(prompt_json)!r}), {max_tokens}, 'exact', None, "
            f"{str(work / 'bench_ref.npz')!r}, prepared_dir={str(prepared)!r})"
        ),
    ]
    lane_cmd = [
        PY,
        "-c",
        (
            "from parity_both import pipeline as p; "
            f"p.lane_eval(p.read_json({str(backend)!r}), {model!r}, p.read_json({str(prompt_json)!r}), "
            f"{str(ref_npz)!r}, 1, {str(work / 'bench_lane.npz')!r})"
        ),
    ]
    ref_wall, ref_rss = median_child(ref_cmd, reps)
    lane_wall, lane_rss = median_child(lane_cmd, reps)
    n_tok = seq_len(longest)
    ratio = ref_wall / lane_wall
    rows.append(
        row(
            "P1",
            f"reference {ref_wall:.2f} s / llama lane {lane_wall:.2f} s = {ratio:.2f}x "
            f"({n_tok} tokens, max_tokens {max_tokens})",
            "<= 3x",
            ratio <= 3.0,
        )
    )
    # Informational: a longer greedy continuation costs the reference one full weight read per token
    # (float32, memory-bound) while the lane evaluates the whole sequence in one batch.
    long_cmd = [
        PY,
        "-c",
        (
            "import os; os.environ.setdefault('OPENBLAS_NUM_THREADS','1'); "
            "from parity_both import pipeline as p; "
            f"p.reference_logits({model!r}, p.read_json({str(prompt_json)!r}), 16, 'exact', None, "
            f"{str(work / 'bench_ref16.npz')!r}, prepared_dir={str(prepared)!r})"
        ),
    ]
    long_wall, _ = median_child(long_cmd, reps)
    long_lane = [
        PY,
        "-c",
        (
            "from parity_both import pipeline as p; "
            f"p.lane_eval(p.read_json({str(backend)!r}), {model!r}, p.read_json({str(prompt_json)!r}), "
            f"{str(work / 'bench_ref16.npz')!r}, 1, {str(work / 'bench_lane16.npz')!r})"
        ),
    ]
    long_lane_wall, _ = median_child(long_lane, reps)
    rows.append(
        row(
            "P1b",
            f"same with 16 generated tokens: {long_wall:.2f} s / {long_lane_wall:.2f} s = "
            f"{long_wall / long_lane_wall:.2f}x",
            "(information)",
            None,
        )
    )
    rows.append(
        row(
            "P2a",
            f"reference peak RSS {ref_rss:.0f} MB (embedded model; lane {lane_rss:.0f} MB)",
            "<= 400 MB",
            ref_rss <= 400,
        )
    )
    rows.extend(bench_bitnet_rss(work, smoke))
    rows.extend(bench_graph_tools(model, work, smoke))
    from bench_2b import bench_2b  # noqa: PLC0415 - bench/ is on sys.path (script directory)

    rows.extend(bench_2b(work, smoke, row))

    # P3: the lane phase with two lanes at --cores 2 vs --cores 1.
    if len(lanes) >= 2:
        targets = [f"results/smol/lanes/{lane}/{p}.npz" for lane in lanes for p in prompts]
        t = {}
        for cores in (1, 2):
            t0 = time.perf_counter()
            snakemake(work, "--cores", str(cores), "--forcerun", *targets, "--", *targets)
            t[cores] = time.perf_counter() - t0
        snakemake(work)
        r3 = t[2] / t[1]
        rows.append(
            row(
                "P3",
                f"lane phase {t[2]:.1f} s at --cores 2 / {t[1]:.1f} s at --cores 1 = {r3:.2f}",
                "<= 0.65",
                r3 <= 0.65,
            )
        )
    else:
        rows.append(row("P3", "needs two lanes (--lanes a,b)", "<= 0.65", None))

    # P4: an up-to-date run vs Snakemake's own floor (a one-rule workflow that is up to date).
    floor_dir = work / "floor"
    floor_dir.mkdir(exist_ok=True)
    (floor_dir / "Snakefile").write_text('rule a:\n    output: "a.txt"\n    shell: "touch {output}"\n')
    floor_cmd = [
        PY,
        "-m",
        "snakemake",
        "a.txt",
        "-s",
        str(floor_dir / "Snakefile"),
        "-d",
        str(floor_dir),
        "--cores",
        "1",
    ]
    timed_child(floor_cmd)
    timing_reps = 1 if smoke else reps + 2
    floor, _ = median_child(floor_cmd, timing_reps)
    uptodate_cmd = [
        PY,
        "-m",
        "snakemake",
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(work),
        "--configfile",
        str(work / "config.yaml"),
        "--profile",
        str(REPO / "profiles/default"),
        "results/summary.json",
    ]
    up, _ = median_child(uptodate_cmd, timing_reps)
    rows.append(row("P4", f"up-to-date run {up:.2f} s (Snakemake floor {floor:.2f} s)", "<= 1.5 s", up <= 1.5))

    # P5: reruns after tokenizer.json edits.
    tok.write_text(json.dumps(json.loads(tok.read_text()), indent=1))
    ran = jobs_run(snakemake(work))
    evals = [j for j in ran if j in ("reference", "lane_eval")]
    never = [j for j in ran if j in ("backend", "model_facts")]
    rows.append(
        row(
            "P5a",
            f"reformatted tokenizer.json: {len(evals)} evaluation jobs, {len(never)} backend/sha "
            f"jobs rerun ({', '.join(sorted(set(ran)))})",
            "0 and 0",
            not evals and not never,
        )
    )
    drop_merge_for(tok, prompts["code"]["text"], avoid=[p["text"] for k, p in prompts.items() if k != "code"])
    proc = snakemake(work, check=False)
    ran = jobs_run(proc)
    n_ref, n_lane = ran.count("reference"), ran.count("lane_eval")
    never = [j for j in ran if j in ("backend", "model_facts")]
    ok = n_ref == 1 and n_lane == len(lanes) and not never
    rows.append(
        row(
            "P5b",
            f"edit changing one prompt's ids: {n_ref} reference, {n_lane} lane jobs rerun",
            f"1 and {len(lanes)}",
            ok,
        )
    )

    # P6: SHA-256 speed against sha256sum on the same file (warm page cache for both).
    from parity_both.gguf.reader import sha256_file
    from parity_both.hashing import sha256_cached

    subprocess.run(["sha256sum", model], capture_output=True, check=True)
    ours, theirs = [], []
    for _ in range(reps + 2):
        t0 = time.perf_counter()
        sha256_file(model)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        subprocess.run(["sha256sum", model], capture_output=True, check=True)
        theirs.append(time.perf_counter() - t0)
    speed = statistics.median(theirs) / statistics.median(ours)
    _, reused = sha256_cached(model)
    rows.append(
        row(
            "P6",
            f"sha256 {statistics.median(ours):.3f} s vs sha256sum {statistics.median(theirs):.3f} s "
            f"= {speed:.2f}x speed; second lookup reused: {reused}",
            ">= 0.8x",
            speed >= 0.8 and reused,
        )
    )
    return rows


_CAPTURE_CHILD = """
import json, sys, time
from parity_both.lanes.llama_cpp_python import LlamaCppPythonLane
lane = LlamaCppPythonLane(sys.argv[1], n_ctx=96, threads=1)
ids = lane.tokenize(sys.argv[3], False)
t0 = time.perf_counter(); lane.eval_logits(ids); plain = time.perf_counter() - t0
t0 = time.perf_counter(); lane.eval_capture(ids, sys.argv[2]); captured = time.perf_counter() - t0
lane.close()
print(json.dumps({"n": len(ids), "plain_s": plain, "capture_s": captured}))
"""
CAPTURE_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden press adapted from wine presses."
)


def bench_graph_tools(model: str, work: Path, smoke: bool) -> list[dict[str, Any]]:
    """G1 the lossless twin (build time, disk, RSS), G2 the per-node capture (eval with and without it, size),
    K1 the op-by-op kernel check against the reference forward (bench/bench_kernels.py, same process)."""
    twin = work / "twin-F32.gguf"
    wall, rss, rc = timed_child([PY, "-m", "parity_both.gguf.twin", model, str(twin)])
    size = Path(model).stat().st_size
    rows = [
        row(
            "G1",
            f"F32 twin of the embedded model: {wall:.1f} s, {twin.stat().st_size / 1e6:.0f} MB on disk "
            f"({twin.stat().st_size / size:.1f}x the file), peak RSS {rss:.0f} MB"
            if rc == 0
            else "twin failed",
            "RSS <= 400 MB (streamed)",
            rc == 0 and rss <= 400,
        )
    ]
    out = subprocess.run(
        [PY, "-c", _CAPTURE_CHILD, model, str(work / "capture"), CAPTURE_TEXT],
        capture_output=True,
        text=True,
        check=True,
    )
    cap = json.loads(out.stdout.strip().splitlines()[-1])
    mb = (work / "capture.npz").stat().st_size / 1e6
    rows.append(
        row(
            "G2",
            f"capture of every node, {cap['n']} tokens: eval {cap['plain_s']:.2f} s, with capture "
            f"{cap['capture_s']:.2f} s, {mb:.0f} MB npz (only on a failing graph verdict or diagnose)",
            "information",
            None,
        )
    )
    out = subprocess.run(
        [PY, str(REPO / "bench" / "bench_kernels.py"), "--repeats", "1" if smoke else "3"],
        capture_output=True,
        text=True,
        check=True,
    )
    k = json.loads(out.stdout[out.stdout.index("{") :])
    ratio = k["ratio_cpu"]["exact"]
    rows.append(
        row(
            "K1",
            f"kernel check {k['median']['kernels']['cpu_s']:.2f} s CPU / reference forward "
            f"{k['median']['reference_exact']['cpu_s']:.2f} s (exact; ggml mode "
            f"{k['ratio_cpu']['ggml']:.2f}x), {k['n_tokens']} tokens, status {k['kernels_status']}",
            "<= 3x",
            ratio <= 3.0 and k["kernels_status"] == "pass",
        )
    )
    return rows


def bench_bitnet_rss(work: Path, smoke: bool) -> list[dict[str, Any]]:
    """P2b: the reference on a generated bitnet model of a few hundred MB."""
    try:
        from parity_both import fixtures  # noqa: F401
        from parity_both.reference import engine

        engine.graph_for("bitnet")
    except (ImportError, NotImplementedError):
        return [row("P2b", "bitnet reference not available", "<= file + 50% + 200 MB", None)]
    size = "small" if smoke else "large"
    path = work / f"bitnet-{size}.gguf"
    # a few hundred MB of ternary weights (d=2048, 12 layers: ~330 MB as TQ2_0) unless --smoke
    dims = (
        []
        if smoke
        else [
            "--dim",
            "n_embd=2048",
            "--dim",
            "n_layer=12",
            "--dim",
            "n_head=16",
            "--dim",
            "n_head_kv=4",
            "--dim",
            "n_ff=5632",
        ]
    )
    cmd = [
        PY,
        "-m",
        "parity_both.fixtures",
        "--arch",
        "bitnet",
        "--weight-type",
        "TQ2_0",
        "--size",
        size,
        "--seed",
        "0",
        *dims,
        str(path),
    ]
    if subprocess.run(cmd, capture_output=True).returncode != 0:
        return [row("P2b", "could not generate the bitnet fixture", "<= file + 50% + 200 MB", None)]
    mb = path.stat().st_size / 2**20
    ref_cmd = [
        PY,
        "-c",
        (
            "import os; os.environ.setdefault('OPENBLAS_NUM_THREADS','1'); "
            "from parity_both.reference import run_reference; "
            f"run_reference({str(path)!r}, [1, 2, 3, 4, 5, 6, 7, 8], 4, prepared_dir={str(work / 'prep-bitnet')!r})"
        ),
    ]
    timed_child(ref_cmd)  # first run writes the per-model prepared cache (the pipeline's prepare job)
    wall, rss = median_child(ref_cmd, 1)
    limit = mb * 1.5 + 200
    return [
        row(
            "P2b",
            f"bitnet {size} fixture {mb:.0f} MB: reference peak RSS {rss:.0f} MB ({wall:.1f} s)",
            f"<= {limit:.0f} MB",
            rss <= limit,
        )
    ]


def print_table(rows: list[dict[str, Any]]) -> None:
    w = max(len(r["measure"]) for r in rows)
    print(f"{'id':<4}  {'measure':<{w}}  {'target':<22}  result")
    print(f"{'-' * 4}  {'-' * w}  {'-' * 22}  ------")
    for r in rows:
        print(f"{r['id']:<4}  {r['measure']:<{w}}  {r['target']:<22}  {r['result']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lanes", default="llama,llama-2024")
    ap.add_argument("--smoke", action="store_true", help="fewer repetitions, smaller fixtures")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="parity-bench-"))
    try:
        rows = bench([s for s in args.lanes.split(",") if s], args.smoke, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(r["result"] != "FAIL" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
