"""A fast toy lane program for tests of lane-check: the reference tokenizer (via the reference
engine's program) and pseudo-random but causal, deterministic logits, with an optional defect.

    python tools/lane_programs/toy_engine.py [--defect none|shape|nan|nondet|exit] SUBCOMMAND ...

Defects: shape (one logit column short), nan (a NaN logit), nondet (noise that changes every run),
exit (bad input answered with exit 3, engine failure, instead of 2).
"""

from __future__ import annotations

import hashlib
import os
import sys
from typing import Any

import numpy as np

from parity_both.lanes import protocol_server
from parity_both.lanes.protocol_server import EvalSettings, serve
from parity_both.lanes.reference_engine import ReferenceProgram, split_engine_args


class ToyProgram(ReferenceProgram):
    def __init__(self, defect: str) -> None:
        super().__init__()
        self.defect = defect

    def info(self) -> dict[str, Any]:
        return {"engine": f"toy engine (defect {self.defect})", "engine_version": "1", "capabilities": []}

    def eval(self, model: str, ids: list[int], settings: EvalSettings) -> tuple[np.ndarray, dict[str, Any]]:
        nv = self.n_vocab(model)
        rows = []
        for i in range(len(ids)):  # row i depends on ids[0..i] only
            seed = int.from_bytes(hashlib.sha256(np.asarray(ids[: i + 1], "<i4").tobytes()).digest()[:8], "little")
            rows.append(np.random.default_rng(seed).standard_normal(nv, dtype=np.float32))
        logits = np.stack(rows)
        if self.defect == "shape":
            logits = logits[:, :-1]
        elif self.defect == "nan":
            logits[-1, 7] = np.nan
        elif self.defect == "nondet":
            logits += (
                np.random.default_rng(int.from_bytes(os.urandom(8), "little")).standard_normal(
                    logits.shape, dtype=np.float32
                )
                * 1e-3
            )
        used = {
            "threads": settings.threads,
            "n_ctx": settings.n_ctx,
            "n_batch": settings.n_batch,
            "type_k": settings.type_k,
            "type_v": settings.type_v,
        }
        return logits, used


def main() -> int:
    opts, request = split_engine_args(sys.argv[1:])
    defect = opts.get("defect", "none")
    if defect == "exit":
        protocol_server.EXIT_BAD_INPUT = protocol_server.EXIT_ENGINE  # the rule broken: bad input is exit 2
    return serve(lambda: ToyProgram(defect), request)


if __name__ == "__main__":
    sys.exit(main())
