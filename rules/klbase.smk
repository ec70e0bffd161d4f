rule kl_base:
    """The reference's logits of a corpus prompt as a llama.cpp KL base file: compare any engine with
    `llama-perplexity -m MODEL --kl-divergence-base FILE --kl-divergence -c WINDOW` (parity_both/report/klbase.py)."""
    input:
        prompt=prompt_record,
        reference=f"{OUT}/{{model}}/reference/{{prompt}}.npz",
    output:
        f"{OUT}/{{model}}/kl-base/{{prompt}}.bin",
    conda:
        "../envs/parity-both.yaml"
    log:
        f"{OUT}/logs/{{model}}/kl-base/{{prompt}}.log",
    benchmark:
        f"{OUT}/benchmarks/{{model}}/kl-base/{{prompt}}.tsv"
    threads: 1
    resources:
        **RES["kl_base"],
    script:
        "../scripts/kl_base.py"
