from parity_both import pipeline
from parity_both.jobs import run_job


def main() -> None:
    sm = snakemake  # noqa: F821
    tok = sm.input.tokenizer[0] if sm.input.tokenizer else None
    record = pipeline.authority_record(sm.input.gguf, sm.params.source, tok, sm.output.tokenizer)
    pipeline.write_json(sm.output.authority, record)


run_job(snakemake, main)  # noqa: F821
