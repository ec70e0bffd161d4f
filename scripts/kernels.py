from parity_both import pipeline
from parity_both.compare import diagnostics
from parity_both.jobs import run_job


def main() -> None:
    sm = snakemake  # noqa: F821
    section = diagnostics.kernel_check(
        backend=pipeline.read_json(sm.input.backend),
        lane_gguf=sm.input.gguf,
        prompt=pipeline.read_json(sm.input.prompt),
        reference_npz=sm.input.reference,
        activation=sm.params.activation,
        threads=sm.params.threads,
        capture_prefix=sm.params.capture_prefix,
        keep_capture=sm.params.diagnose,
        max_tokens=sm.params.max_tokens,
    )
    pipeline.write_json(sm.output[0], section)


run_job(snakemake, main)  # noqa: F821
