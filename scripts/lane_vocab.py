from parity_both import pipeline
from parity_both.jobs import run_job


def main() -> None:
    sm = snakemake  # noqa: F821
    pipeline.write_json(sm.output[0], pipeline.lane_vocab(pipeline.read_json(sm.input.backend), sm.input.gguf))


run_job(snakemake, main)  # noqa: F821
