rule reference:
    """Reference logits (our NumPy engine) for the prompt plus its greedy continuation."""
    input:
        gguf=model_gguf,
        prompt=prompt_record,
    output:
        f"{OUT}/{{model}}/reference/{{prompt}}.npz",
    params:
        max_tokens=config.get("max_tokens", 8),
        mode=REF["mode"],
        activation=model_activation,
    conda:
        "../envs/parity-both.yaml"
    log:
        f"{OUT}/logs/{{model}}/reference/{{prompt}}.log",
    benchmark:
        f"{OUT}/benchmarks/{{model}}/reference/{{prompt}}.tsv"
    threads: 1
    script:
        "../scripts/reference.py"
