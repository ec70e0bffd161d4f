import json

import numpy as np

from parity_both.jobs import run_job
from parity_both.report.klbase import write_kl_base


def main() -> None:
    sm = snakemake  # noqa: F821
    prompt = json.loads(open(sm.input.prompt).read())
    if not prompt.get("window_starts"):
        raise ValueError(f"prompt {sm.wildcards.prompt!r} is not a corpus prompt: a KL base file needs windows")
    ref = np.load(sm.input.reference)
    ids, logits, window = list(ref["ids"]), ref["logits"], int(prompt["prompt"]["window"])
    starts = list(prompt["window_starts"])
    write_kl_base(sm.output[0], [ids[s : s + window] for s in starts], [logits[s : s + window] for s in starts])


run_job(snakemake, main)  # noqa: F821
