"""What every lane engine offers, whatever its kind (llama-cpp-python or the C++ harness).

The pipeline feeds every lane the SAME canonical token ids (teacher forcing) and asks for logits at
every position; the lane's own tokenization of the formatted prompt is asked for separately and
compared id by id before any logits are computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from parity_both.tokenize.attrs import TOKEN_KINDS  # noqa: F401 - the kinds a VocabDump names


@dataclass(frozen=True)
class TokenizationContract:
    """One explicit contract per prompt, applied identically to the reference and every lane.

    The engine tokenizes the text with add_special=False; BOS/EOS are then added here, by id,
    exactly when the contract says so, so no engine default can silently add a second BOS.
    """

    add_bos: bool
    add_eos: bool
    parse_special: bool

    def as_dict(self) -> dict[str, bool]:
        return {"add_bos": self.add_bos, "add_eos": self.add_eos, "parse_special": self.parse_special}


@dataclass
class VocabDump:
    """A vocabulary as an engine reports it: what the lane-side tokenizer authority hashes."""

    tokens: list[tuple[int, str, str]]  # (id, token text as stored in the vocab, kind)
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    add_eos: bool
    extra: dict[str, Any] = field(default_factory=dict)


class LaneEngine(Protocol):
    def identity(self) -> dict[str, Any]:
        """Engine, version/revision, API generation, library paths, build flags."""
        ...

    def settings(self) -> dict[str, Any]:
        """Determinism settings actually used: threads, n_ctx, n_batch, KV types, flash attention."""
        ...

    def vocab(self) -> VocabDump: ...

    def tokenize(self, text: str, parse_special: bool) -> list[int]:
        """The engine's own tokenization of text WITHOUT BOS/EOS (add_special=False)."""
        ...

    def piece(self, token_id: int) -> str:
        """Readable piece of one id (for mismatch reports)."""
        ...

    def eval_logits(self, ids: list[int]) -> np.ndarray:
        """float32 [len(ids), n_vocab]: row i = logits after ids[: i + 1], one batch, fresh cache."""
        ...

    def eval_capture(self, ids: list[int], out_prefix: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
        """eval_logits plus every graph node the same decode evaluates (ggml's cb_eval), written as
        {out_prefix}.npz + {out_prefix}.json in the capture format (lanes/capture.py); returns
        (logits, the JSON index). The logits are bitwise those of eval_logits."""
        ...

    def close(self) -> None: ...


def apply_contract(
    body_ids: list[int], contract: TokenizationContract, bos_id: int | None, eos_id: int | None
) -> list[int]:
    """Add BOS/EOS by id as the contract says (one place, used by the reference and every lane)."""
    ids = list(body_ids)
    if contract.add_bos:
        if bos_id is None or bos_id < 0:
            raise ValueError("contract asks for BOS but the vocabulary has no BOS token")
        ids = [bos_id, *ids]
    if contract.add_eos:
        if eos_id is None or eos_id < 0:
            raise ValueError("contract asks for EOS but the vocabulary has no EOS token")
        ids = [*ids, eos_id]
    return ids
