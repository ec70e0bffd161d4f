from parity_both import pipeline
from parity_both.gguf.transcode import transcode
from parity_both.jobs import run_job


def main() -> None:
    sm = snakemake  # noqa: F821
    pipeline.write_json(sm.output.effect, transcode(sm.input.gguf, sm.output.gguf))


run_job(snakemake, main)  # noqa: F821
