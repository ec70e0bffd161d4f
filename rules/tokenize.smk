rule tokenizer_authority:
    """Decide and record which tokenizer is the authority, and write the effective tokenizer.json."""
    input:
        gguf=model_gguf,
        tokenizer=tokenizer_inputs,
    output:
        authority=f"{OUT}/{{model}}/tokenizer/authority.json",
        tokenizer=f"{OUT}/{{model}}/tokenizer/tokenizer.json",
    params:
        source=tokenizer_source,
    conda:
        "../envs/parity-both.yaml"
    log:
        f"{OUT}/logs/{{model}}/tokenizer_authority.log",
    benchmark:
        f"{OUT}/benchmarks/{{model}}/tokenizer_authority.tsv"
    threads: 1
    resources:
        **RES["tokenizer_authority"],
    script:
        "../scripts/tokenizer_authority.py"


checkpoint format_prompt:
    """Template, formatted prompt, tokenization contract and canonical token ids of one prompt."""
    input:
        gguf=model_gguf,
        authority=f"{OUT}/{{model}}/tokenizer/authority.json",
        tokenizer=f"{OUT}/{{model}}/tokenizer/tokenizer.json",
        corpus=corpus_inputs,
    output:
        record=f"{OUT}/{{model}}/prompts/{{prompt}}.json",
    params:
        prompt=prompt_settings,
        context={"max_tokens": config["max_tokens"], "truncate": config["truncate_prompt"]},
    conda:
        "../envs/parity-both.yaml"
    log:
        f"{OUT}/logs/{{model}}/prompts/{{prompt}}.log",
    benchmark:
        f"{OUT}/benchmarks/{{model}}/prompts/{{prompt}}.tsv"
    threads: 1
    resources:
        **RES["format_prompt"],
    script:
        "../scripts/format_prompt.py"
