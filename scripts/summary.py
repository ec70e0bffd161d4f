from parity_both import pipeline
from parity_both.jobs import run_job
from parity_both.summary import render_text


def main() -> None:
    sm = snakemake  # noqa: F821
    summary = pipeline.make_summary(list(sm.input))
    pipeline.write_json(sm.output.json, summary)
    with open(sm.output.text, "w") as fh:
        fh.write(render_text(summary))


run_job(snakemake, main)  # noqa: F821
