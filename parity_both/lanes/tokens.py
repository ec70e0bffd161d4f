"""The lane's own tokenization of a prompt (its engine's tokenizer under the prompt's contract, or the corpus
windows), and its id-by-id comparison with the reference's canonical ids: the token-parity check a lane job
makes before any logits are computed."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from parity_both.corpus import corpus_windows
from parity_both.lanes.base import TokenizationContract, apply_contract


def compare_ids(ref_ids: list[int], ref_pieces: list[str], lane_ids: list[int], lane_pieces: list[str]) -> dict:
    n = min(len(ref_ids), len(lane_ids))
    first = next((i for i in range(n) if ref_ids[i] != lane_ids[i]), None)
    if first is None and len(ref_ids) != len(lane_ids):
        first = n
    out: dict[str, Any] = {"match": first is None, "ref_len": len(ref_ids), "lane_len": len(lane_ids)}
    if first is not None:
        out["first_divergent_pos"] = first
        out["ref_id"] = ref_ids[first] if first < len(ref_ids) else None
        out["lane_id"] = lane_ids[first] if first < len(lane_ids) else None
        out["ref_piece"] = ref_pieces[first] if first < len(ref_pieces) else None
        out["lane_piece"] = lane_pieces[first] if first < len(lane_pieces) else None
    return out


def lane_tokenization(engine: Any, prompt: Mapping[str, Any]) -> list[int]:
    """The lane's own token ids for the prompt: the formatted text under the prompt's contract, or for a corpus
    the text file chunked into the same windows."""
    vocab = engine.specials() if hasattr(engine, "specials") else engine.vocab()  # only BOS/EOS are read
    if prompt.get("window_starts"):
        meta = prompt["prompt"]
        body = engine.tokenize(Path(meta["corpus"]).read_text(encoding="utf-8"), False)
        bos = vocab.bos_id if vocab.add_bos else None
        return [i for w in corpus_windows(body, int(meta["window"]), int(meta["windows"]), bos) for i in w]
    contract = TokenizationContract(**prompt["contract"])
    body = engine.tokenize(prompt["formatted"], contract.parse_special)
    ids = apply_contract(body, contract, vocab.bos_id, vocab.eos_id)
    cut = (prompt.get("context") or {}).get("truncated_to")  # --truncate-prompt: the lane's ids are cut alike
    return ids[:cut] if cut else ids
