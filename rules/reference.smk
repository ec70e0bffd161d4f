rule reference:
    """Reference logits (our NumPy engine) for the prompt plus its greedy continuation."""
    input:
        gguf=model_gguf,
        prompt=prompt_record,
        prepared=prepared_weights,
    output:
        f"{OUT}/{{model}}/reference/{{prompt}}.npz",
    params:
        max_tokens=config["max_tokens"],
        mode=REF["mode"],
        activation=model_activation,
        blas_threads=REF_BLAS_THREADS,
    conda:
        "../envs/parity-both.yaml"
    log:
        f"{OUT}/logs/{{model}}/reference/{{prompt}}.log",
    benchmark:
        f"{OUT}/benchmarks/{{model}}/reference/{{prompt}}.tsv"
    threads: 1
    resources:
        **RES["reference"],
    script:
        "../scripts/reference.py"


rule prepare_reference:
    """Dequantize a model's weights once (float32, per model), reused by every prompt and run of the
    exact reference: the reference job then streams them from a memory map."""
    input:
        gguf=model_gguf,
    output:
        manifest=f"{OUT}/{{model}}/reference/prepared/manifest.json",
        weights=f"{OUT}/{{model}}/reference/prepared/weights.bin",
    conda:
        "../envs/parity-both.yaml"
    log:
        f"{OUT}/logs/{{model}}/prepare_reference.log",
    benchmark:
        f"{OUT}/benchmarks/{{model}}/prepare_reference.tsv"
    threads: 1
    resources:
        **RES["prepare_reference"],
    script:
        "../scripts/prepare_reference.py"


rule twin_reference:
    """Reference logits on the lossless twin (always exact: its weights are plain floats). The FFN
    activation default follows the original file's architecture, which the twin's key prefix may hide."""
    input:
        gguf=f"{OUT}/{{model}}/twin/{{dtype}}.gguf",
        record=f"{OUT}/{{model}}/twin/{{dtype}}.json",
        prompt=prompt_record,
    output:
        f"{OUT}/{{model}}/twin/{{dtype}}/reference/{{prompt}}.npz",
    params:
        max_tokens=config["max_tokens"],
        mode="exact",
        activation=model_activation,
        blas_threads=REF_BLAS_THREADS,
    conda:
        "../envs/parity-both.yaml"
    log:
        f"{OUT}/logs/{{model}}/twin_{{dtype}}/reference/{{prompt}}.log",
    benchmark:
        f"{OUT}/benchmarks/{{model}}/twin_{{dtype}}/reference/{{prompt}}.tsv"
    threads: 1
    resources:
        **RES["twin_reference"],
    script:
        "../scripts/reference.py"
