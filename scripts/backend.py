from parity_both import pipeline
from parity_both.jobs import run_job


def main() -> None:
    sm = snakemake  # noqa: F821
    from parity_both.provision.provision import provision_lane

    record = provision_lane(
        sm.wildcards.lane,
        sm.input.probe,
        repair=sm.config.get("repair"),
        log_path=sm.log[0],
        threads=sm.threads,
        config={"backends": sm.params.backends},
    )
    pipeline.write_json(sm.output[0], record)


run_job(snakemake, main)  # noqa: F821
