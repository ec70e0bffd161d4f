import os

from parity_both.jobs import run_job
from parity_both.reference import prepare_weights


def main() -> None:
    sm = snakemake  # noqa: F821
    budget = (sm.config.get("reference") or {}).get("prepared_budget")
    manifest = prepare_weights(sm.input.gguf, os.path.dirname(sm.output.manifest), budget_factor=budget)
    print(f"prepared {len(manifest.get('tensors', manifest))} tensors", flush=True)


run_job(snakemake, main)  # noqa: F821
