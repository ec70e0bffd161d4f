"""Lanes: one engine each, run in its own process (one Snakemake job)."""
