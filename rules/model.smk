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
    benchmark:
        f"{OUT}/benchmarks/{{model}}/model_facts.tsv"
    threads: 1
    resources:
        **RES["model_facts"],
    script:
        "../scripts/model_facts.py"


rule fixture:
    """A deterministic generated model (parity_both.fixtures) with a real vocabulary."""
    output:
        f"{OUT}/fixtures/{{model}}.gguf",
    params:
        spec=fixture_spec,
    conda:
        "../envs/parity-both.yaml"
    log:
        f"{OUT}/logs/{{model}}/fixture.log",
    benchmark:
        f"{OUT}/benchmarks/{{model}}/fixture.tsv"
    threads: 1
    resources:
        **RES["fixture"],
    script:
        "../scripts/fixture.py"


rule transcode:
    """A copy of a BitNet.cpp-format model that mainline llama.cpp loads (I2_S -> TQ2_0, fork key prefix
    -> bitnet), for lanes that cannot load the original; the effect record says exactly what changed."""
    input:
        gguf=model_gguf,
    output:
        gguf=f"{OUT}/{{model}}/transcoded/mainline.gguf",
        effect=f"{OUT}/{{model}}/transcoded/effect.json",
    conda:
        "../envs/parity-both.yaml"
    log:
        f"{OUT}/logs/{{model}}/transcode.log",
    benchmark:
        f"{OUT}/benchmarks/{{model}}/transcode.tsv"
    threads: 1
    resources:
        **RES["transcode"],
    script:
        "../scripts/transcode.py"


rule twin:
    """The lossless twin: every tensor dequantized (F32 by default), metadata and vocabulary unchanged
    (BitNet.cpp's key prefix renamed as for the transcode), written tensor by tensor; the record says
    what the conversion rounded. Every lane and the reference evaluate it for the graph verdict."""
    input:
        gguf=model_gguf,
        facts=f"{OUT}/{{model}}/model.json",  # a model refused by model_facts (e.g. NaN weights) gets no twin
    output:
        gguf=f"{OUT}/{{model}}/twin/{{dtype}}.gguf",
        record=f"{OUT}/{{model}}/twin/{{dtype}}.json",
    conda:
        "../envs/parity-both.yaml"
    log:
        f"{OUT}/logs/{{model}}/twin_{{dtype}}.log",
    benchmark:
        f"{OUT}/benchmarks/{{model}}/twin_{{dtype}}.tsv"
    threads: 1
    resources:
        **RES["twin"],
    script:
        "../scripts/twin.py"
