rule model_facts:
    """Path, size, SHA-256 and the GGUF keys that matter."""
    input:
        gguf=model_gguf,
    output:
        f"{OUT}/{{model}}/model.json",
    conda:
        "../envs/parity-both.yaml"
    log:
        f"{OUT}/logs/{{model}}/model_facts.log",
    script:
        "../scripts/model_facts.py"
