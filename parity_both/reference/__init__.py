"""The NumPy reference ("the oracle"): what a llama.cpp-family engine should compute.

    from parity_both.reference import run_reference, ReferenceResult
    res = run_reference(model_path, prompt_ids, max_tokens, mode="exact", activation=None,
                        stop_ids=(), prepared_dir=None)
    index, arrays = reference_capture(model_path, ids, mode="exact", activation=None,
                                      generation="2024-10")   # intermediates, lanes' capture format

Files: hparams.py (HParams from GGUF metadata; hparams_families.py for qwen2/qwen3/phi3/gemma2/gemma3
and llama experts), weights.py (WeightStore: dequantization, streaming, linear), ops.py (norms, RoPE,
attention, GELU, soft-capping, tracing), blocks.py (QKV, head norms, per-layer RoPE, MoE FFN),
llama.py / bitnet.py / qwen.py / phi3.py / gemma.py (the forward graphs),
engine.py (GRAPHS, load_model, greedy loop, settings), trace.py (intermediates under llama.cpp's
node names, reference_capture), ggml_emul.py (ggml's quantized matmul arithmetic).
"""

from parity_both.reference.engine import ReferenceResult, run_reference
from parity_both.reference.prepared import prepare_weights
from parity_both.reference.trace import reference_capture

__all__ = ["ReferenceResult", "prepare_weights", "reference_capture", "run_reference"]
