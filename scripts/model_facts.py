from parity_both import pipeline
from parity_both.jobs import run_job


def main() -> None:
    pipeline.write_json(snakemake.output[0], pipeline.model_facts(snakemake.input.gguf))  # noqa: F821


run_job(snakemake, main)  # noqa: F821
