import json

from parity_both.jobs import run_job
from parity_both.report.plots import plot_layers, plot_positions


def main() -> None:
    sm = snakemake  # noqa: F821
    receipt = json.loads(open(sm.input.receipt).read())
    plot_positions(receipt, sm.output.positions)
    plot_layers(receipt, sm.output.layers)


run_job(snakemake, main)  # noqa: F821
