from parity_both import pipeline
from parity_both.jobs import run_job


def main() -> None:
    sm = snakemake  # noqa: F821
    pipeline.write_summary(pipeline.make_summary(list(sm.input)), sm.output.json, sm.output.text)


run_job(snakemake, main)  # noqa: F821
