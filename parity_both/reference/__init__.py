"""The NumPy reference ("the oracle"): what a llama.cpp-family engine should compute.

    from parity_both.reference import run_reference, ReferenceResult
    res = run_reference(model_path, prompt_ids, max_tokens, mode="exact", activation=None,
                        stop_ids=(), prepared_dir=None)

See engine.py (dispatch, greedy loop), llama.py (the graph), ops.py, weights.py.
"""

from parity_both.reference.engine import ReferenceResult, run_reference
from parity_both.reference.weights import prepare_weights

__all__ = ["ReferenceResult", "prepare_weights", "run_reference"]
