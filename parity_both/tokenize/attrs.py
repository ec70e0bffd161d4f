"""Token types and attributes as llama.h defines them, and the one mapping from attributes to the kind
names every side of a comparison uses (reference, llama-cpp-python lane, C++ harness lane)."""

from __future__ import annotations

# llama.h: enum llama_token_type (what the GGUF stores) and enum llama_token_attr (what the API reports).
TT_UNDEFINED, TT_NORMAL, TT_UNKNOWN, TT_CONTROL, TT_USER_DEFINED, TT_UNUSED, TT_BYTE = range(7)
ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_NORMALIZED = 1 << 6
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8
ATTR_SINGLE_WORD = 1 << 9
# The bits that decide a token's kind; the others (normalized, lstrip, rstrip, single word) modify it.
ATTR_KIND_MASK = 0x3F

TYPE_TO_ATTR = {
    TT_UNKNOWN: ATTR_UNKNOWN,
    TT_UNUSED: ATTR_UNUSED,
    TT_NORMAL: ATTR_NORMAL,
    TT_CONTROL: ATTR_CONTROL,
    TT_USER_DEFINED: ATTR_USER_DEFINED,
    TT_BYTE: ATTR_BYTE,
    TT_UNDEFINED: ATTR_UNDEFINED,
}

# Most specific first: a NORMAL piece llama.cpp forces to CONTROL (NORMAL|CONTROL) reads as control; a control
# piece whose text says "unused" (CONTROL|UNUSED) as unused.
_KIND_ORDER = (
    (ATTR_UNKNOWN, "unknown"),
    (ATTR_UNUSED, "unused"),
    (ATTR_CONTROL, "control"),
    (ATTR_USER_DEFINED, "user_defined"),
    (ATTR_BYTE, "byte"),
    (ATTR_NORMAL, "normal"),
)
TOKEN_KINDS = tuple(kind for _, kind in _KIND_ORDER) + ("undefined",)


def kind_from_attr(attr: int) -> str:
    """One kind per token from llama.cpp's attribute bits (several bits can be set at once)."""
    for bit, kind in _KIND_ORDER:
        if attr & bit:
            return kind
    return "undefined"
