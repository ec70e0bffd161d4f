from parity_both import pipeline
from parity_both.fixtures import write_fixture
from parity_both.jobs import run_job


def main() -> None:
    sm = snakemake  # noqa: F821
    spec = dict(sm.params.spec)
    facts = write_fixture(sm.output[0], **spec)
    pipeline.log.info("fixture %s", facts)


run_job(snakemake, main)  # noqa: F821
