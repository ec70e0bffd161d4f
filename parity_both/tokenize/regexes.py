"""llama.cpp's pre-tokenizer regexes as tokenizers' regex engine (onig) must see them to split identically."""

from __future__ import annotations

from functools import cache

from parity_both.tokenize.tables import LETTER_SUBCATEGORIES, NEWER_THAN_LLAMA_CPP_UNICODE


def hf_regex(rx: str) -> str:
    """llama.cpp's regex as onig (tokenizers' engine) must see it to split identically."""
    if "\\p{" in rx:
        # llama.cpp's collapsed-category engine treats every letter subcategory as \p{L}.
        for sub in LETTER_SUBCATEGORIES:
            rx = rx.replace(sub, "\\p{L}")
        return _pin_unicode_categories(rx)
    # Without categories llama.cpp runs std::wregex on the text with every non-ASCII whitespace
    # replaced by U+000B: such characters then match only \s, never a positive character class
    # (deepseek's "[　-。]" or "[ࠀ-一]" ranges contain U+3000 / U+2000...).
    return _exclude_nonascii_ws(rx)


_NON_ASCII_WS = "\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}"


def _exclude_nonascii_ws(rx: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(rx):
        c = rx[i]
        if c == "\\":
            out.append(rx[i : i + 2])
            i += 2
            continue
        if c != "[":
            out.append(c)
            i += 1
            continue
        j = i + 1  # find the closing bracket (classes in llama.cpp's table do not nest)
        while j < len(rx) and rx[j] != "]" or j == i + 1:
            j += 2 if rx[j] == "\\" else 1
        body = rx[i + 1 : j]
        keep = body.startswith("^") or all(ord(ch) < 0x80 for ch in body)
        out.append(f"[{body}]" if keep else f"[{body}&&[^{_NON_ASCII_WS}]]")
        i = j + 1
    return "".join(out)


@cache
def _newer_class() -> str:
    parts = []
    for item in NEWER_THAN_LLAMA_CPP_UNICODE.split():
        a, _, b = item.partition("-")
        parts.append(f"\\x{{{a}}}-\\x{{{b}}}" if b else f"\\x{{{a}}}")
    return "[^" + "".join(parts) + "]"


def _pin_unicode_categories(rx: str) -> str:
    excl = _newer_class()
    for cat in ("L", "N", "P", "M", "S"):
        rx = rx.replace(f"\\p{{{cat}}}", f"[\\p{{{cat}}}&&{excl}]")
    return rx
