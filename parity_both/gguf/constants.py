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

# BitNet.cpp's ternary tensor type id (in mainline ggml the id is retired).
I2_S_TYPE_ID = 36
