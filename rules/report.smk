rule receipt:
    """Compare one lane with the reference for one prompt (schema v3 receipt: the quantized verdict on
    the model file; the graph verdict on the lossless twin, skipped when the model's twin is off)."""
    input:
        unpack(twin_receipt_inputs),
        unpack(kernel_inputs),
        model=f"{OUT}/{{model}}/model.json",
        authority=f"{OUT}/{{model}}/tokenizer/authority.json",
        tokenizer=f"{OUT}/{{model}}/tokenizer/tokenizer.json",
        prompt=prompt_record,
        reference=f"{OUT}/{{model}}/reference/{{prompt}}.npz",
        lane=f"{OUT}/{{model}}/lanes/{{lane}}/{{prompt}}.npz",
        lane_vocab=f"{OUT}/{{model}}/lanes/{{lane}}/vocab.json",
        backend=f"{OUT}/backends/{{lane}}.json",
        transcode=lane_transcode_effect,
    output:
        f"{OUT}/{{model}}/receipts/{{lane}}/{{prompt}}.json",
    params:
        thresholds=lane_thresholds,
        mode=REF["mode"],
        gates=config["gates"],
        lane_gguf=lane_gguf,
    conda:
        "../envs/parity-both.yaml"
    log:
        f"{OUT}/logs/{{model}}/receipts/{{lane}}/{{prompt}}.log",
    benchmark:
        f"{OUT}/benchmarks/{{model}}/receipts/{{lane}}/{{prompt}}.tsv"
    threads: 1
    resources:
        **RES["receipt"],
    script:
        "../scripts/receipt.py"


rule summary:
    """One verdict over every model, lane and prompt."""
    input:
        receipts(),
    output:
        json=f"{OUT}/summary.json",
        text=f"{OUT}/summary.txt",
    conda:
        "../envs/parity-both.yaml"
    log:
        f"{OUT}/logs/summary.log",
    benchmark:
        f"{OUT}/benchmarks/summary.tsv"
    threads: 1
    resources:
        **RES["summary"],
    script:
        "../scripts/summary.py"


# The verdict of a run that failed: a job's failure stops the summary rule, so the handler writes
# summary.failed.{json,txt} from the receipts that exist and the failure records the jobs wrote
# beside their logs (the `parity-both` command prints exactly that), and removes summary.{json,txt}
# so no earlier run's verdict stands. A later run that succeeds removes summary.failed.*.
onsuccess:
    from parity_both.pipeline import clear_failed_summary

    clear_failed_summary(OUT)


onerror:
    from parity_both.pipeline import write_failed_summary

    try:
        path = write_failed_summary(OUT, receipts(), LANES, RUN_STARTED)
        print(f"parity-both: the run failed; its summary is {path} (and {path.with_suffix('.txt')})", file=sys.stderr)
    except Exception as err:  # the handler must not mask the run's own failure
        print(f"parity-both: could not write the failed run's summary: {err!r}", file=sys.stderr)


rule localize:
    """Where a lane departs from the reference on the lossless twin: when its graph verdict fails (or
    diagnose is on), every node the lane evaluates and every node the reference computes are captured
    (kept in capture/ beside the record) and paired by llama.cpp's node names."""
    input:
        backend=f"{OUT}/backends/{{lane}}.json",
        gguf=f"{OUT}/{{model}}/twin/{{dtype}}.gguf",
        record=f"{OUT}/{{model}}/twin/{{dtype}}.json",
        prompt=prompt_record,
        reference=f"{OUT}/{{model}}/twin/{{dtype}}/reference/{{prompt}}.npz",
        lane=f"{OUT}/{{model}}/twin/{{dtype}}/lanes/{{lane}}/{{prompt}}.npz",
    output:
        f"{OUT}/{{model}}/twin/{{dtype}}/localize/{{lane}}/{{prompt}}.json",
    params:
        thresholds=lambda wc: {k: pbconfig.thresholds(config, k) for k in pbconfig.GRAPH_SETS},
        floor=config["localization_floor"],
        diagnose=config["diagnose"],
        activation=model_activation,
        threads=config["threads"],
        capture_dir=lambda wc: f"{OUT}/{wc.model}/twin/{wc.dtype}/capture/{wc.lane}/{wc.prompt}",
        max_tokens=config["capture_max_tokens"],
    conda:
        "../envs/parity-both.yaml"
    log:
        f"{OUT}/logs/{{model}}/twin_{{dtype}}/localize/{{lane}}/{{prompt}}.log",
    benchmark:
        f"{OUT}/benchmarks/{{model}}/twin_{{dtype}}/localize/{{lane}}/{{prompt}}.tsv"
    threads: 1
    resources:
        **RES["localize"],
    script:
        "../scripts/localize.py"


rule kernels:
    """The op-by-op kernel check, once per model and lane (kernels are a property of the engine and the file,
    not of the prompt): every node the lane evaluates on the file it evaluates, for the first prompt's leading
    tokens, recomputed from the lane's own captured sources with the model's parameters (ggml's activation
    quantization emulated)."""
    input:
        backend=f"{OUT}/backends/{{lane}}.json",
        gguf=lane_gguf,
        prompt=kernel_prompt_record,
        reference=f"{OUT}/{{model}}/reference/{KERNEL_PROMPT}.npz",
    output:
        f"{OUT}/{{model}}/kernels/{{lane}}.json",
    params:
        activation=model_activation,
        threads=config["threads"],
        diagnose=config["diagnose"],
        capture_prefix=lambda wc: f"{OUT}/{wc.model}/lanes/{wc.lane}/capture/kernels-{KERNEL_PROMPT}",
        max_tokens=config["capture_max_tokens"],
    conda:
        "../envs/parity-both.yaml"
    log:
        f"{OUT}/logs/{{model}}/kernels/{{lane}}.log",
    benchmark:
        f"{OUT}/benchmarks/{{model}}/kernels/{{lane}}.tsv"
    threads: 1
    resources:
        **RES["kernels"],
    script:
        "../scripts/kernels.py"
