import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", str(snakemake.threads))  # noqa: F821
os.environ.setdefault("OMP_NUM_THREADS", str(snakemake.threads))  # noqa: F821

from parity_both import pipeline  # noqa: E402
from parity_both.jobs import run_job  # noqa: E402


def main() -> None:
    sm = snakemake  # noqa: F821
    prepared = os.path.dirname(sm.input.prepared[0]) if sm.input.get("prepared") else None
    record = pipeline.read_json(sm.input.record) if sm.input.get("record") else None
    pipeline.reference_logits(
        sm.input.gguf,
        pipeline.read_json(sm.input.prompt),
        sm.params.max_tokens,
        sm.params.mode,
        sm.params.activation,
        sm.output[0],
        prepared_dir=prepared,
        twin_record=record,
    )


run_job(snakemake, main)  # noqa: F821
