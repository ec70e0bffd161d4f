from parity_both import pipeline
from parity_both.jobs import run_job


def main() -> None:
    sm = snakemake  # noqa: F821
    pipeline.twin(sm.input.gguf, sm.output.gguf, sm.wildcards.dtype, sm.output.record)


run_job(snakemake, main)  # noqa: F821
