"""Facts about GGUF files that several rooms need, defined once (standard library only: the workflow
reads some of them at Snakemake parse time)."""

from __future__ import annotations

GGUF_MAGIC = b"GGUF"

# Architecture names of BitNet b1.58 graphs. `bitnet` is mainline llama.cpp's; the others are written only by
# BitNet.cpp's forks and Microsoft's published GGUF (mainline cannot load them).
BITNET_FORK_ARCHS = frozenset({"bitnet-b1.58", "bitnet-25", "bitnet_b1_58", "bitnet-b158"})
MAINLINE_BITNET_ARCH = "bitnet"
# The BitNet architectures the reference computes (the fork's aliases above normalise to these).
BITNET_ARCHS = ("bitnet", "bitnet-b1.58", "bitnet-25")

# general.architecture values the NumPy reference computes: the keys of reference.engine.GRAPHS (a test checks
# they are equal). Here, standard library only, so preflight and Snakemake's parse time can refuse a model
# without importing numpy.
REFERENCE_ARCHS = ("llama", *BITNET_ARCHS, "qwen2", "qwen3", "phi3", "gemma2", "gemma3")


def unsupported_arch_message(arch: str) -> str:
    """The one line naming an architecture the reference cannot compute, and the supported list."""
    return f"the reference has no forward graph for architecture {arch!r} (supported: {', '.join(REFERENCE_ARCHS)})"


# BitNet.cpp's ternary tensor type id (in mainline ggml the id is retired).
I2_S_TYPE_ID = 36

# ---- GGUF metadata value types (gguf.h enum gguf_type) ------------------------------------------
GGUF_DEFAULT_ALIGNMENT = 32
VT_UINT8, VT_INT8, VT_UINT16, VT_INT16, VT_UINT32, VT_INT32, VT_FLOAT32, VT_BOOL = range(8)
VT_STRING, VT_ARRAY, VT_UINT64, VT_INT64, VT_FLOAT64 = range(8, 13)
# scalar value type -> (struct format, byte size)
VALUE_SCALARS: dict[int, tuple[str, int]] = {
    VT_UINT8: ("<B", 1),
    VT_INT8: ("<b", 1),
    VT_UINT16: ("<H", 2),
    VT_INT16: ("<h", 2),
    VT_UINT32: ("<I", 4),
    VT_INT32: ("<i", 4),
    VT_FLOAT32: ("<f", 4),
    VT_BOOL: ("<?", 1),
    VT_UINT64: ("<Q", 8),
    VT_INT64: ("<q", 8),
    VT_FLOAT64: ("<d", 8),
}

# ---- tensor types: id -> (ggml name, block elements, block bytes) ---------------------------------
MAINLINE_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}
# I2_S: 4 ternary codes per byte in blocks of 128 elements, then I2S_TAIL_BYTES per tensor (f32 scale, pad).
I2S_BLOCK = 128
I2S_TAIL_BYTES = 32
# BitNet.cpp's fork reuses 36-39. Only I2_S has a layout we can read; the others are named so the
# refusal message can say what the tensor is.
BITNET_TYPES: dict[int, tuple[str, int, int]] = {
    **{k: v for k, v in MAINLINE_TYPES.items() if k < 36},
    I2_S_TYPE_ID: ("I2_S", 4, 1),
    37: ("I8_S", 1, 1),
    38: ("TL1", 0, 0),
    39: ("TL2", 0, 0),
}
# The ids a writer uses per type name: mainline's, plus BitNet.cpp's I2_S (retired in mainline, so a
# file holding it is read with BitNet.cpp numbering).
TYPE_IDS: dict[str, int] = {**{name: tid for tid, (name, _b, _s) in MAINLINE_TYPES.items()}, "I2_S": I2_S_TYPE_ID}
# llama.h LLAMA_FTYPE_* for whole-file types (40 = MOSTLY_I2_S in BitNet.cpp's fork, MOSTLY_Q1_0 in mainline)
FILE_TYPES: dict[str, int] = {
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q8_0": 7,
    "BF16": 32,
    "TQ1_0": 36,
    "TQ2_0": 37,
    "I2_S": 40,
}


# Tensor types the reference cannot dequantize (BitNet.cpp's lookup-table formats).
REFERENCE_UNREADABLE_TYPES = frozenset({"I8_S", "TL1", "TL2"})


def reference_refusal(arch: str, type_ids: frozenset[int] | set[int]) -> str | None:
    """One line when the reference cannot compute a model with this general.architecture and these tensor
    type ids (parse-time check from gguf.peek.peek_format), else None."""
    if arch not in REFERENCE_ARCHS and arch not in BITNET_FORK_ARCHS:
        return unsupported_arch_message(arch)
    table = BITNET_TYPES if arch in BITNET_FORK_ARCHS or I2_S_TYPE_ID in type_ids else MAINLINE_TYPES
    for tid in sorted(type_ids):
        name = table.get(tid, (None,))[0]
        if name is None or name in REFERENCE_UNREADABLE_TYPES:
            return (
                f"the reference cannot compute tensor type {name or f'id {tid}'} ({arch} model); "
                f"unreadable types: {', '.join(sorted(REFERENCE_UNREADABLE_TYPES))} and unknown ids"
            )
    return None
