import json
from pathlib import Path

from parity_both.jobs import run_job
from parity_both.report.plots import summary_table


def main() -> None:
    sm = snakemake  # noqa: F821
    Path(sm.output[0]).write_text(summary_table(json.loads(Path(sm.input[0]).read_text())))


run_job(snakemake, main)  # noqa: F821
