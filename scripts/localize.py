from parity_both import pipeline
from parity_both.compare import diagnostics
from parity_both.jobs import run_job


def main() -> None:
    sm = snakemake  # noqa: F821
    section = diagnostics.localization(
        backend=pipeline.read_json(sm.input.backend),
        twin_gguf=sm.input.gguf,
        twin_record=pipeline.read_json(sm.input.record),
        prompt=pipeline.read_json(sm.input.prompt),
        reference_npz=sm.input.reference,
        lane_npz=sm.input.lane,
        thresholds=sm.params.thresholds,
        floor=sm.params.floor,
        diagnose=sm.params.diagnose,
        activation=sm.params.activation,
        threads=sm.params.threads,
        capture_dir=sm.params.capture_dir,
        max_tokens=sm.params.max_tokens,
    )
    pipeline.write_json(sm.output[0], section)


run_job(snakemake, main)  # noqa: F821
