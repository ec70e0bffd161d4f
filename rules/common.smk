# Parse-time helpers: standard library only (see parity_both/config.py) so that an up-to-date
# run answers fast. `validate` also fills every default from the schema (the one place defaults
# live), so rules read config[...] directly.
import os
import sys
import time
from pathlib import Path

from snakemake.utils import validate

from parity_both import config as pbconfig
from parity_both.provision import probes


validate(config, schema="../schemas/config.schema.yaml")

OUT = config["out_dir"]
RUN_STARTED = time.time()  # failure records written after this belong to this run
# this run's id (the `parity-both` command passes its own; plain snakemake gets one): the jobs inherit
# it and the summary records it beside, never inside, the deterministic receipts
RUN_ID = pbconfig.run_id()
MODELS = sorted(config["models"])
PROMPTS = sorted(config["prompts"])
KERNEL_PROMPT = PROMPTS[0]  # the kernel check's sequence: the first prompt's leading tokens
LANES = list(config["lanes"])
REF = pbconfig.reference_settings(config)
# A caller's OPENBLAS_NUM_THREADS (scripts/reference.py sets the job's threads only when it is unset): with
# n > 1 the reference shares matmul row blocks out to n threads in other block shapes, which moves float32
# rounding, so the reference rules take it as a param (a change reruns them)
REF_BLAS_THREADS = os.environ.get("OPENBLAS_NUM_THREADS", "")


wildcard_constraints:
    model="[A-Za-z0-9][A-Za-z0-9._-]*",
    prompt="[A-Za-z0-9][A-Za-z0-9._-]*",
    lane="[A-Za-z0-9][A-Za-z0-9._-]*",
    dtype="auto|F32|F16|BF16",


def _fail_config(err):
    raise WorkflowError(f"config: {err}")


def _check_models():
    """A model file that is not a usable GGUF is refused at parse time: one message naming the model,
    its file and the problem, before any job runs (remembered per file once it passes)."""
    from parity_both.gguf.lowlevel import GGUFError
    from parity_both.gguf.peek import peek_format_cached

    for name in MODELS:
        if config["models"][name].get("fixture"):
            continue
        try:
            path = pbconfig.model_path(config, name)
        except pbconfig.ConfigError as err:
            _fail_config(err)
        if Path(path).is_file():
            try:
                peek_format_cached(path)
            except (GGUFError, OSError) as err:
                raise WorkflowError(
                    f"model {name} ({path}): {err}; pass a complete, valid GGUF file (re-download or re-convert it)"
                ) from None


def model_gguf(wildcards):
    try:
        path = pbconfig.model_path(config, wildcards.model)
    except pbconfig.ConfigError as err:
        _fail_config(err)
    if not config["models"][wildcards.model].get("fixture") and Path(path).is_file():
        from parity_both.gguf.constants import reference_refusal
        from parity_both.gguf.peek import peek_format_cached

        refusal = reference_refusal(*peek_format_cached(path))
        if refusal is not None:  # bad input: refused before any job runs
            raise WorkflowError(f"model {wildcards.model}: {refusal}")
    return path


_check_models()


def tokenizer_inputs(wildcards):
    """The tokenizer.json the authority is built from (none for gguf_embedded)."""
    try:
        source, path = pbconfig.tokenizer_source(config, wildcards.model)
    except pbconfig.ConfigError as err:
        _fail_config(err)
    return [path] if path else []


def tokenizer_source(wildcards):
    return pbconfig.tokenizer_source(config, wildcards.model)[0]


def prompt_settings(wildcards):
    return pbconfig.prompt_settings(config, wildcards.prompt)


def corpus_inputs(wildcards):
    path = pbconfig.corpus_file(config, wildcards.prompt)
    return [path] if path else []


def prompt_record(wildcards):
    # format_prompt is a checkpoint: after it runs, Snakemake re-evaluates the jobs below it, and
    # because the prompt record is checksummed, an unchanged record does not rerun them.
    return checkpoints.format_prompt.get(model=wildcards.model, prompt=wildcards.prompt).output.record


def lane_gguf(wildcards):
    """The file a lane evaluates: the model itself, or its transcoded mainline copy when the model is in
    BitNet.cpp's format and the lane's engine cannot load that (mainline llama.cpp cannot)."""
    if pbconfig.needs_mainline_copy(config, wildcards.model) and not probes.loads_bitnet_format(
        wildcards.lane, config
    ):
        return f"{OUT}/{wildcards.model}/transcoded/mainline.gguf"
    return model_gguf(wildcards)


def lane_transcode_effect(wildcards):
    if lane_gguf(wildcards) != model_gguf(wildcards):
        return [f"{OUT}/{wildcards.model}/transcoded/effect.json"]
    return []


def twin_dir(wildcards):
    """results/{model}/twin/{dtype}: the lossless twin of the model (graph verdict), or None (`twin: off`)."""
    dtype = pbconfig.twin_dtype(config, wildcards.model)
    return f"{OUT}/{wildcards.model}/twin/{dtype}" if dtype else None


def twin_gguf(wildcards):
    return f"{twin_dir(wildcards)}.gguf"


def twin_record(wildcards):
    return f"{twin_dir(wildcards)}.json"


def twin_receipt_inputs(wildcards):
    """The graph verdict's inputs for a receipt: none when the model's twin is off (verdict skipped)."""
    base = twin_dir(wildcards)
    if base is None:
        return {}
    return {
        "twin_record": f"{base}.json",
        "twin_reference": f"{base}/reference/{wildcards.prompt}.npz",
        "twin_lane": f"{base}/lanes/{wildcards.lane}/{wildcards.prompt}.npz",
        "localization": f"{base}/localize/{wildcards.lane}/{wildcards.prompt}.json",
    }


def kernel_prompt_record(wildcards):
    return checkpoints.format_prompt.get(model=wildcards.model, prompt=KERNEL_PROMPT).output.record


def kernel_inputs(wildcards):
    """The op-by-op kernel check's record for a receipt, unless `kernels: false`."""
    if not config["kernels"] or not probes.stamp_can_capture(probe_stamp(wildcards.lane)):
        return {}  # also for a command lane whose program has no capture extension
    return {"kernels": f"{OUT}/{wildcards.model}/kernels/{wildcards.lane}.json"}


def fixture_spec(wildcards):
    return dict(config["models"][wildcards.model]["fixture"])


def prepared_weights(wildcards):
    # only the exact mode reads dequantized weights; the ggml mode works on the quantized blocks
    if REF["mode"] != "exact":
        return []
    return [f"{OUT}/{wildcards.model}/reference/prepared/manifest.json"]


def model_activation(wildcards):
    return pbconfig.model_activation(config, wildcards.model)


def probe_stamp(lane):
    return f"{OUT}/backends/.probes/{lane}.json"


def _probe_lanes():
    # Cheap check of each lane's installed/built backend before the DAG is built, written to a small
    # stamp file only when it changed: a vanished or changed backend thereby updates an input of its
    # backend job, which runs again - that is the repair (or, with repair disabled, the failure that
    # names the repair command). After a repair the job itself rewrites the stamp, so the next run
    # has nothing to do.
    for lane in LANES:
        text = probes.probe_lane_text(lane, config)
        if workflow.is_main_process:
            probes.write_if_changed(probe_stamp(lane), text)


_probe_lanes()


def lane_thresholds(wildcards):
    """The quantized verdict's thresholds (the reference mode's set) and the graph verdict's."""
    return {
        "quantized": pbconfig.thresholds(config, REF["mode"]),
        **{k: pbconfig.thresholds(config, k) for k in pbconfig.GRAPH_SETS},
    }


def receipts():
    return [
        f"{OUT}/{model}/receipts/{lane}/{prompt}.json"
        for model in MODELS
        for lane in LANES
        for prompt in PROMPTS
    ]


def _drop_local_rate_limiter():
    """Snakemake 9's job rate limiter (--max-jobs-per-timespan, default 100/1s) re-arms a one-second
    timer on every scheduler pass, and every finished job starts one more such chain of passes while
    jobs wait for a core: by the end of a demo run dozens of passes per second, each re-checking every
    waiting job's inputs (a quarter of the run's CPU time, measured). On a local run it limits nothing
    (our jobs start far below 100 per second), so it is dropped there; cluster executors keep it."""
    scheduler = getattr(workflow, "scheduler", None)
    if workflow.local_exec and scheduler is not None and hasattr(scheduler, "job_rate_limiter"):
        scheduler.job_rate_limiter = None


onstart:
    _drop_local_rate_limiter()
