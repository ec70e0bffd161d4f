rule lane_vocab:
    """The lane's own view of the vocabulary, read through its engine (lane-side authority)."""
    input:
        backend=f"{OUT}/backends/{{lane}}.json",
        gguf=lane_gguf,
    output:
        f"{OUT}/{{model}}/lanes/{{lane}}/vocab.json",
    conda:
        "../envs/parity-both.yaml"
    log:
        f"{OUT}/logs/{{model}}/lanes/{{lane}}/vocab.log",
    benchmark:
        f"{OUT}/benchmarks/{{model}}/lanes/{{lane}}/vocab.tsv"
    threads: 1
    resources:
        **RES["lane_vocab"],
    script:
        "../scripts/lane_vocab.py"


rule lane_eval:
    """The lane's own tokenization of the formatted prompt and, when the ids match, its logits for
    the canonical sequence (teacher forcing), in its own process."""
    input:
        backend=f"{OUT}/backends/{{lane}}.json",
        gguf=lane_gguf,
        prompt=prompt_record,
        reference=f"{OUT}/{{model}}/reference/{{prompt}}.npz",
    output:
        f"{OUT}/{{model}}/lanes/{{lane}}/{{prompt}}.npz",
    params:
        threads=config["threads"],
    conda:
        "../envs/parity-both.yaml"
    log:
        f"{OUT}/logs/{{model}}/lanes/{{lane}}/{{prompt}}.log",
    benchmark:
        f"{OUT}/benchmarks/{{model}}/lanes/{{lane}}/{{prompt}}.tsv"
    threads: 1
    resources:
        **RES["lane_eval"],
    script:
        "../scripts/lane_eval.py"


rule twin_lane_eval:
    """The lane on the lossless twin, teacher-forced with the twin reference's sequence (graph verdict)."""
    input:
        backend=f"{OUT}/backends/{{lane}}.json",
        gguf=f"{OUT}/{{model}}/twin/{{dtype}}.gguf",
        prompt=prompt_record,
        reference=f"{OUT}/{{model}}/twin/{{dtype}}/reference/{{prompt}}.npz",
    output:
        f"{OUT}/{{model}}/twin/{{dtype}}/lanes/{{lane}}/{{prompt}}.npz",
    params:
        threads=config["threads"],
    conda:
        "../envs/parity-both.yaml"
    log:
        f"{OUT}/logs/{{model}}/twin_{{dtype}}/lanes/{{lane}}/{{prompt}}.log",
    benchmark:
        f"{OUT}/benchmarks/{{model}}/twin_{{dtype}}/lanes/{{lane}}/{{prompt}}.tsv"
    threads: 1
    resources:
        **RES["twin_lane_eval"],
    script:
        "../scripts/lane_eval.py"
