from parity_both import pipeline
from parity_both.jobs import run_job


def main() -> None:
    sm = snakemake  # noqa: F821
    from parity_both.config import repair_mode
    from parity_both.provision.probes import provision_lane

    mode, why = repair_mode(sm.config)
    record = provision_lane(sm.wildcards.lane, sm.input.probe, mode, why, sm.log[0], sm.threads,
                            config={"backends": sm.params.backends})
    pipeline.write_json(sm.output[0], record)


run_job(snakemake, main)  # noqa: F821
