rule backend:
    """Check (and, when repair is allowed, provision) one lane's engine."""
    input:
        probe=f"{OUT}/backends/.probes/{{lane}}.json",
    output:
        f"{OUT}/backends/{{lane}}.json",
    params:
        repair=REPAIR_MODE,
        repair_why=REPAIR_WHY,
        backends=config.get("backends", {}),
    conda:
        "../envs/parity-both.yaml"
    log:
        f"{OUT}/logs/backends/{{lane}}.log",
    threads: 2
    script:
        "../scripts/backend.py"
