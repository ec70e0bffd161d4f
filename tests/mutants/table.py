"""Planted bugs for the mutation suite (issues 10 and 11): one-line (or few-line) patches to the
October-2024 llama.cpp tree (the ``llama-2024`` lane's tree: llama-cpp-python 0.3.1's
``vendor/llama.cpp``).

Each entry says what it breaks and where an op-by-op check must catch it: the node by llama.cpp's
graph naming (``build_llama``; a name is reused for consecutive nodes, so the op is given too) and,
for kernel bugs, the op and the weight type / first weight that exercises the patched code on this
machine's build (x86-64 AVX2, ``GGML_LLAMAFILE`` on: Q8_0 x Q8_0 and F32 x F32 batch matmuls go
through tinyBLAS, Q4_1 and TQ2_0 through ``ggml_vec_dot_*``; ``GET_ROWS`` through ``to_float``).
Every ``old`` text occurs exactly once in its file (``verify_patches`` checks it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

LLAMA_CPP = "src/llama.cpp"
QUANTS = "ggml/src/ggml-quants.c"

# context that makes an edit unique: build_llama's Granite residual scale (only build_llama has it in
# this tree), the AVX2 branch of ggml_vec_dot_q4_1_q8_1 (the only one followed by d0v = set1(d0))
_GRANITE_RES = (
    "            // For Granite architecture\n            if (hparams.f_residual_scale) {\n"
    "                cur = ggml_scale(ctx0, cur, hparams.f_residual_scale);\n            }\n\n"
)
_Q4_1_AVX2_TAIL = (
    "        const float d1 = GGML_FP16_TO_FP32(y[ib].d);\n\n"
    "        summs += GGML_FP16_TO_FP32(x[ib].m) * GGML_FP16_TO_FP32(y[ib].s);\n\n"
    "        const __m256 d0v = _mm256_set1_ps( d0 );\n"
)


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the llama.cpp tree
    old: str  # exact text, occurring once in `file`
    new: str
    kind: str  # graph | kernel
    breaks: str
    caught_at: str  # node name (llama.cpp graph naming) and op; for kernels also op + weight type
    models: tuple[str, ...] = ("q4_1", "f32")  # where the patched code runs (embedded model / its F32 twin)

    def digest(self) -> str:
        """Content hash of the patch (file, old, new): the key of its tree and build."""
        h = hashlib.sha256()
        for part in (self.file, self.old, self.new):
            h.update(part.encode() + b"\0")
        return h.hexdigest()


_MUTANTS: tuple[Mutant, ...] = (
    # ------------------------------------------------------------------------------ graph mutants
    Mutant(
        name="rope-base",
        file=LLAMA_CPP,
        old="        freq_base        (cparams.rope_freq_base),\n",
        new="        freq_base        (cparams.rope_freq_base * 1.5f),\n",
        kind="graph",
        breaks="RoPE frequency base x1.5 (llm_build_context::freq_base, read by every ggml_rope_ext)",
        caught_at="Qcur-0 (ROPE, the second Qcur-0) and Kcur-0 (ROPE): op_params freq_base 1.5x the "
        "GGUF's llama.rope.freq_base",
    ),
    Mutant(
        name="kq-scale",
        file=LLAMA_CPP,
        old="        const float kq_scale = hparams.f_attention_scale == 0.0f ? "
        "1.0f/sqrtf(float(n_embd_head)) : hparams.f_attention_scale;\n"
        "        for (int il = 0; il < n_layer; ++il) {\n"
        "            struct ggml_tensor * inpSA = inpL;\n\n"
        "            // norm\n",
        new="        const float kq_scale = hparams.f_attention_scale == 0.0f ? "
        "1.0f/sqrtf(float(n_embd_head + 2)) : hparams.f_attention_scale;\n"
        "        for (int il = 0; il < n_layer; ++il) {\n"
        "            struct ggml_tensor * inpSA = inpL;\n\n"
        "            // norm\n",
        kind="graph",
        breaks="attention scale 1/sqrt(d+2) instead of 1/sqrt(d) (build_llama kq_scale)",
        caught_at="kq_soft_max_ext-0 (SOFT_MAX, op_params scale 1/sqrt(66) instead of 1/sqrt(64))",
    ),
    Mutant(
        name="causal-mask",
        file=LLAMA_CPP,
        old="if (!kv_self.cells[i].has_seq_id(seq_id) || kv_self.cells[i].pos > pos) {",
        new="if (!kv_self.cells[i].has_seq_id(seq_id) || kv_self.cells[i].pos > pos + 1) {",
        kind="graph",
        breaks="causal mask off by one: each token also sees the next one (llama_set_inputs KQ_mask)",
        caught_at="kq_soft_max_ext-0 (SOFT_MAX; its mask source KQ_mask is not the causal mask); "
        "first differing activation kqv-0",
    ),
    Mutant(
        name="rms-eps",
        file=LLAMA_CPP,
        old="        case LLM_NORM_RMS: cur = ggml_rms_norm(ctx, cur, hparams.f_norm_rms_eps); break;\n",
        new="        case LLM_NORM_RMS: cur = ggml_rms_norm(ctx, cur, hparams.f_norm_rms_eps * 1e4f); break;\n",
        kind="graph",
        breaks="RMSNorm epsilon x1e4 where build_llama reads it (llm_build_norm; "
        "llm_build_context::norm_rms_eps is unused there)",
        caught_at="norm-0 (RMS_NORM feeding attn_norm-0; op_params eps 0.1 vs the GGUF's 1e-5)",
    ),
    Mutant(
        name="silu-gelu",
        file=LLAMA_CPP,
        old='                cur = ggml_silu(ctx, cur);\n                cb(cur, "ffn_silu", il);\n',
        new='                cur = ggml_gelu(ctx, cur);\n                cb(cur, "ffn_silu", il);\n',
        kind="graph",
        breaks="FFN activation GELU instead of SiLU (llm_build_ffn, LLM_FFN_SILU)",
        caught_at="ffn_silu-0 (op GELU where the llama architecture defines SILU)",
    ),
    Mutant(
        name="ffn-gate-up-swap",
        file=LLAMA_CPP,
        old="    struct ggml_tensor * tmp = up ? llm_build_lora_mm(lctx, ctx, up, cur) : cur;\n",
        new="    struct ggml_tensor * tmp = up ? llm_build_lora_mm(lctx, ctx, gate ? gate : up, cur) : cur;\n"
        "    if (gate && up) { gate = up; }\n",
        kind="graph",
        breaks="FFN gate and up projections swapped: silu(x W_up) * (x W_gate) (llm_build_ffn)",
        caught_at="ffn_up-0 (MUL_MAT reading blk.0.ffn_gate.weight) / ffn_gate-0 (reading "
        "blk.0.ffn_up.weight); first differing activation ffn_silu-0",
    ),
    Mutant(
        name="ffn-no-residual",
        file=LLAMA_CPP,
        old=_GRANITE_RES + '            cur = ggml_add(ctx0, cur, ffn_inp);\n            cb(cur, "ffn_out", il);\n',
        new=_GRANITE_RES + '            cur = ggml_add(ctx0, cur, inpSA);\n            cb(cur, "ffn_out", il);\n',
        kind="graph",
        breaks="residual wiring: the FFN output is added to the layer input (inpSA) instead of ffn_inp, "
        "so the attention block's output is dropped from the residual stream (build_llama)",
        caught_at="ffn_out-0 (the ADD: its second source is inp_embd / l_out-(i-1), not ffn_inp-0)",
    ),
    # ----------------------------------------------------------------------------- kernel mutants
    Mutant(
        name="q4_1-min-scaled",
        file=QUANTS,
        old="        const float d1 = GGML_FP16_TO_FP32(y[ib].d);\n\n"
        "        summs += GGML_FP16_TO_FP32(x[ib].m) * GGML_FP16_TO_FP32(y[ib].s);\n\n"
        "        const __m256 d0v = _mm256_set1_ps( d0 );\n",
        new="        const float d1 = GGML_FP16_TO_FP32(y[ib].d);\n\n"
        "        summs += 0.75f * GGML_FP16_TO_FP32(x[ib].m) * GGML_FP16_TO_FP32(y[ib].s);\n\n"
        "        const __m256 d0v = _mm256_set1_ps( d0 );\n",
        kind="kernel",
        breaks="Q4_1 block min (offset) term scaled by 0.75 in ggml_vec_dot_q4_1_q8_1, AVX2 branch",
        caught_at="MUL_MAT with a q4_1 weight: first at Qcur-0 (blk.0.attn_q.weight), every Q4_1 matmul",
        models=("q4_1",),
    ),
    Mutant(
        name="q4_1-min-subtle",
        file=QUANTS,
        old="        const float d1 = GGML_FP16_TO_FP32(y[ib].d);\n\n"
        "        summs += GGML_FP16_TO_FP32(x[ib].m) * GGML_FP16_TO_FP32(y[ib].s);\n\n"
        "        const __m256 d0v = _mm256_set1_ps( d0 );\n",
        new="        const float d1 = GGML_FP16_TO_FP32(y[ib].d);\n\n"
        "        summs += 0.995f * GGML_FP16_TO_FP32(x[ib].m) * GGML_FP16_TO_FP32(y[ib].s);\n\n"
        "        const __m256 d0v = _mm256_set1_ps( d0 );\n",
        kind="kernel",
        breaks="Q4_1 block min (offset) term 0.5% too small in ggml_vec_dot_q4_1_q8_1, AVX2 branch: a bug the "
        "end-to-end comparison on the quantized model cannot see",
        caught_at="MUL_MAT with a q4_1 weight: first at Qcur-0 (blk.0.attn_q.weight), every Q4_1 matmul",
        models=("q4_1",),
    ),
    Mutant(
        name="q4_1-scale-wrong-block",
        file=QUANTS,
        old="        const float d0 = GGML_FP16_TO_FP32(x[ib].d);\n" + _Q4_1_AVX2_TAIL,
        new="        const float d0 = GGML_FP16_TO_FP32(x[ib ^ 1].d);\n" + _Q4_1_AVX2_TAIL,
        kind="kernel",
        breaks="Q4_1 block scale d read from the neighbouring block (ib^1; rows have an even number of "
        "blocks) in ggml_vec_dot_q4_1_q8_1, AVX2 branch",
        caught_at="MUL_MAT with a q4_1 weight: first at Qcur-0 (blk.0.attn_q.weight), every Q4_1 matmul",
        models=("q4_1",),
    ),
    Mutant(
        name="q8_0-dequant-wrong-block",
        file=QUANTS,
        old="        const float d = GGML_FP16_TO_FP32(x[i].d);\n\n"
        "        for (int j = 0; j < qk; ++j) {\n            y[i*qk + j] = x[i].qs[j]*d;\n",
        new="        const float d = GGML_FP16_TO_FP32(x[i ^ 1].d);\n\n"
        "        for (int j = 0; j < qk; ++j) {\n            y[i*qk + j] = x[i].qs[j]*d;\n",
        kind="kernel",
        breaks="Q8_0 dequantization (dequantize_row_q8_0, ggml's to_float for GET_ROWS) takes the "
        "neighbouring block's scale (i^1; 576/32 = 18 blocks per row)",
        caught_at="inp_embd (GET_ROWS of token_embd.weight, q8_0)",
        models=("q4_1",),
    ),
    Mutant(
        name="tq2_0-sign-flip",
        file=QUANTS,
        old="        sumi0 = _mm256_add_epi16(sumi0, sumi1);\n        sumi0 = _mm256_sub_epi16(sumi0, ysum);\n"
        "        sumi0 = _mm256_madd_epi16(sumi0, _mm256_set1_epi16(1));\n",
        new="        sumi0 = _mm256_add_epi16(sumi0, sumi1);\n        sumi0 = _mm256_sub_epi16(ysum, sumi0);\n"
        "        sumi0 = _mm256_madd_epi16(sumi0, _mm256_set1_epi16(1));\n",
        kind="kernel",
        breaks="TQ2_0 ternary decode sign flipped ((1 - q) instead of (q - 1)) in ggml_vec_dot_tq2_0_q8_K, AVX2 branch",
        caught_at="MUL_MAT with a tq2_0 weight: first at Qcur-0 (blk.0.attn_q.weight) of a TQ2_0 model "
        "(the bitnet-tq2 fixture); SmolLM2 never runs it",
        models=("tq2_0",),
    ),
)

MUTANTS: dict[str, Mutant] = {m.name: m for m in _MUTANTS}
