from parity_both import pipeline
from parity_both.jobs import run_job


def main() -> None:
    sm = snakemake  # noqa: F821
    record = pipeline.prompt_record(
        sm.input.gguf,
        pipeline.read_json(sm.input.authority),
        sm.input.tokenizer,
        sm.wildcards.prompt,
        sm.params.prompt,
        sm.params.context,
    )
    pipeline.write_json(sm.output.record, record)


run_job(snakemake, main)  # noqa: F821
