from parity_both import pipeline
from parity_both.jobs import run_job


def main() -> None:
    sm = snakemake  # noqa: F821
    pipeline.lane_eval(
        pipeline.read_json(sm.input.backend),
        sm.input.gguf,
        pipeline.read_json(sm.input.prompt),
        sm.input.reference,
        sm.params.threads,
        sm.output[0],
    )


run_job(snakemake, main)  # noqa: F821
