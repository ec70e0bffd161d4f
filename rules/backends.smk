rule backend:
    """Check (and, when repair is allowed, provision) one lane's engine. The repair mode (auto, never
    under CI, ...) decides HOW a missing backend is handled, not what it is, so it is no param: changing
    it never reruns anything."""
    input:
        probe=f"{OUT}/backends/.probes/{{lane}}.json",
    output:
        f"{OUT}/backends/{{lane}}.json",
    params:
        backends=config["backends"],
    conda:
        "../envs/parity-both.yaml"
    log:
        f"{OUT}/logs/backends/{{lane}}.log",
    benchmark:
        f"{OUT}/benchmarks/backends/{{lane}}.tsv"
    threads: 2
    resources:
        **RES["backend"],
    script:
        "../scripts/backend.py"
