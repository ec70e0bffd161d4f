"""The two graph diagnostics that capture every node a lane evaluates: localization on the lossless twin
(where a lane departs from the reference) and the op-by-op kernel check on the file the lane evaluates."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from parity_both.corpus import windows_of
from parity_both.pipeline import effective_activation, load_lane, load_reference, open_lane


def node_names_generation(backend: Mapping[str, Any]) -> str:
    """Whose graph node names the lane's engine uses: the October-2024 tree's, or current llama.cpp's."""
    identity = backend.get("identity") or {}
    return "2024-10" if identity.get("api_generation") == "2024-10" else "current"


def graph_status(reference_npz: str, lane_npz: str, thresholds: Mapping[str, Any]) -> str:
    """The graph verdict's status, judged exactly as the receipt judges it."""
    from parity_both.receipt import Evaluation, verdict

    return verdict(Evaluation(load_reference(reference_npz), load_lane(lane_npz), {}), thresholds)["status"]


def localization(
    *,
    backend: Mapping[str, Any],
    twin_gguf: str,
    twin_record: Mapping[str, Any],
    prompt: Mapping[str, Any],
    reference_npz: str,
    lane_npz: str,
    thresholds: Mapping[str, Any],
    floor: float,
    diagnose: bool,
    activation: str | None,
    threads: int,
    capture_dir: str,
    max_tokens: int = 64,
) -> dict[str, Any]:
    """The receipt's `localization` section. When the graph verdict fails (or diagnose is on), capture every
    node the lane evaluates on the twin and every node the reference computes, keep both captures beside the
    record, and name the first layer and node where the lane departs."""
    from parity_both.config import twin_graph_thresholds

    status = graph_status(reference_npz, lane_npz, twin_graph_thresholds(thresholds, twin_record))
    if status != "fail" and not diagnose:
        return {"status": "not_run", "reason": f"graph verdict {status} and diagnose is off", "graph_status": status}
    from parity_both.capture import load_capture, save_capture
    from parity_both.compare.localize import localize
    from parity_both.reference import reference_capture

    ids = windows_of(prompt, load_reference(reference_npz)["ids"])[0][:max_tokens]  # a corpus: its first window
    lane_prefix, ref_prefix = Path(capture_dir) / "lane", Path(capture_dir) / "reference"
    from parity_both.lanes.command import CaptureUnsupported

    engine = open_lane(backend, twin_gguf, n_ctx=len(ids) + 8, threads=threads)
    try:
        engine.eval_capture(ids, lane_prefix)
    except CaptureUnsupported as e:  # a command lane without the capture extension
        return {"status": "not_run", "reason": str(e), "graph_status": status}
    finally:
        engine.close()
    index, arrays = reference_capture(
        twin_gguf,
        ids,
        "exact",
        effective_activation(activation, twin_record),
        generation=node_names_generation(backend),
    )
    save_capture(ref_prefix, index, arrays)
    section = localize(load_capture(ref_prefix), load_capture(lane_prefix), floor)
    section.update(
        graph_status=status,
        n_tokens=len(ids),
        names=node_names_generation(backend),
        captures={"lane": str(lane_prefix), "reference": str(ref_prefix)},
    )
    return section


# -- op-by-op kernel check ----------------------------------------------------------------------
def kernel_check(
    *,
    backend: Mapping[str, Any],
    lane_gguf: str,
    prompt: Mapping[str, Any],
    reference_npz: str,
    activation: str | None,
    threads: int,
    capture_prefix: str,
    keep_capture: bool,
    max_tokens: int = 64,
) -> dict[str, Any]:
    """The receipt's `kernels` section: capture every node the lane evaluates on the file it evaluates (the
    quantized model, or its transcoded copy) and recompute each from the lane's own captured sources with the
    model's parameters. The capture is kept beside the section only when diagnosing (it is large)."""
    from parity_both.capture import capture_paths
    from parity_both.compare.kernels import check_kernels

    ids = windows_of(prompt, load_reference(reference_npz)["ids"])[0][:max_tokens]  # a corpus: its first window
    engine = open_lane(backend, lane_gguf, n_ctx=len(ids) + 8, threads=threads)
    try:
        engine.eval_capture(ids, capture_prefix)
    finally:
        engine.close()
    try:
        section = check_kernels(capture_prefix, lane_gguf, activation=activation)
    finally:
        if not keep_capture:
            for path in capture_paths(capture_prefix):
                path.unlink(missing_ok=True)
    section["n_tokens"] = len(ids)
    section["capture"] = capture_prefix if keep_capture else None
    return section
