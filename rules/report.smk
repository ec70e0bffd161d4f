rule receipt:
    """Compare one lane with the reference for one prompt (schema v2 receipt)."""
    input:
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
        gates=config.get("gates", []),
        lane_gguf=lane_gguf,
    conda:
        "../envs/parity-both.yaml"
    log:
        f"{OUT}/logs/{{model}}/receipts/{{lane}}/{{prompt}}.log",
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
    script:
        "../scripts/summary.py"
