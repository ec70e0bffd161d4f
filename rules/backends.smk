rule backend:
    """Check (and, when repair is allowed, provision) one lane's engine."""
    output:
        f"{OUT}/backends/{{lane}}.json",
    params:
        probe=backend_probe,
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
