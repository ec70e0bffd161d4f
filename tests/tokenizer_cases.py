"""Deterministic (seeded) test strings for tokenizer fidelity: what llama.cpp's tokenizers find hard.

Unicode scripts, emoji sequences, digits, whitespace runs (ASCII and not), newlines, contractions,
code, special-token text, byte-token look-alikes, empty and very long inputs. Random code points are
drawn only from those Python's unicodedata (Unicode 14) knows as assigned, which llama.cpp's own
table (Unicode 15.x) assigns too.
"""

from __future__ import annotations

import random
import sys
import unicodedata

WORDS = (
    "the",
    "Hello",
    "world",
    "I",
    "you",
    "LLaMA",
    "tokenizer",
    "parity",
    "BitNet",
    "cpp",
    "a",
    "THE",
    "naïve",
    "café",
    "Straße",
    "über",
    "résumé",
    "Ωmega",
    "x",
    "ab",
    "quick",
    "brown",
    "fox",
)
CONTRACTIONS = (
    "'s",
    "'t",
    "'re",
    "'ve",
    "'m",
    "'ll",
    "'d",
    "'S",
    "'T",
    "'RE",
    "'Ve",
    "'LL",
    "'D",
    "'",
    "''",
    "’s",
    "n't",
    "'x",
)
SCRIPTS = (
    "Cửa Việt",
    "Привет мир",
    "Γειά σου Κόσμε",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "你好，世界",
    "こんにちは世界",
    "カタカナ",
    "안녕하세요 세계",
    "ሰላም",
    "Բարեւ",
    "ქართული",
    "বাংলা",
    "தமிழ்",
    "ﷺ ﷽",
    "١٢٣٤٥",
    "๑๒๓",
    "Ⅻ ⅻ ½ ¾ ²³",
    "ǅ ǈ ǋ",
    "ﬁ ﬂ",
    "Ｆｕｌｌｗｉｄｔｈ",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "e\u0301 a\u0308 n\u0303",
)
EMOJI = ("🤗", "🦙", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "🏳️‍🌈", "❤️", "✨", "🔥🔥🔥", "😀😃😄", "☃", "⌘", "©®™")
WHITESPACE = (
    " ",
    "  ",
    "   ",
    "\t",
    "\n",
    "\n\n",
    "\r\n",
    "\r",
    " \n ",
    "\u00a0",
    "\u3000",
    "\u2003",
    "\u0085",
    "\u2028",
    "\v",
    "\f",
    "\t\t  ",
    "    \n    ",
    "\u200b",
    "\ufeff",
)
CODE = (
    "def f(x):\n    return x**2",
    "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    '<div class="a">',
    "x => x * 2;",
    "a->b",
    "#include <stdio.h>",
    "/* c */ // d",
    "if (a && b || !c) {}",
    "$ ls -la | grep x",
    "SELECT * FROM t WHERE id=1;",
    '{"k": [1, 2.5, null]}',
    "```python\nprint('hi')\n```",
    "...",
    "!!!???",
    "__init__",
    "0x1F",
    "3.14159",
    "1,000,000",
    "1e-5",
)
DIGITS = "0123456789"


def _assigned_codepoints() -> list[int]:
    out = []
    for c in range(0x20, 0x30000):
        if 0xD800 <= c <= 0xDFFF:
            continue
        cat = unicodedata.category(chr(c))
        if cat not in ("Cn", "Cs"):
            out.append(c)
    return out


_ASSIGNED: list[int] | None = None


def assigned() -> list[int]:
    global _ASSIGNED
    if _ASSIGNED is None:
        _ASSIGNED = _assigned_codepoints()
    return _ASSIGNED


def _fragment(rng: random.Random, specials: list[str]) -> str:
    kind = rng.randrange(12)
    if kind == 0:
        return rng.choice(WORDS) + rng.choice(CONTRACTIONS)
    if kind == 1:
        return "".join(rng.choice(DIGITS) for _ in range(rng.randint(1, 12)))
    if kind == 2:
        return rng.choice(WHITESPACE)
    if kind == 3:
        return rng.choice(SCRIPTS)
    if kind == 4:
        return rng.choice(EMOJI)
    if kind == 5:
        return rng.choice(CODE)
    if kind == 6 and specials:
        return rng.choice(specials)
    if kind == 7:
        cps = assigned()
        return "".join(chr(rng.choice(cps)) for _ in range(rng.randint(1, 6)))
    if kind == 8:
        return rng.choice(("<s>", "</s>", "<unk>", "<0x0A>", "<|endoftext|>", "<|im_start|>", "[INST]", "<pad>"))
    if kind == 9:
        return "".join(chr(rng.randint(0x21, 0x7E)) for _ in range(rng.randint(1, 8)))
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5)))


def generate(n: int, seed: int, specials: list[str]) -> list[str]:
    """n strings, the same for the same (n, seed, specials) on every run."""
    rng = random.Random(seed)
    out = ["", " ", "  ", "\n", "Hello world", " Hello world", "I've don't we'll", "   \n\n\t  x  "]
    long_parts = [_fragment(rng, specials) for _ in range(600)]
    out.append("".join(long_parts))  # very long input (thousands of characters)
    out.append("a" * 5000)
    out.append(" " * 3000 + "x")
    while len(out) < n:
        k = rng.randint(1, 10)
        joiner = rng.choice(("", "", " ", "\n", "  "))
        s = joiner.join(_fragment(rng, specials) for _ in range(k))
        if rng.random() < 0.15:
            s = " " + s
        if rng.random() < 0.1:
            s = s + rng.choice(WHITESPACE)
        out.append(s)
    return out[:n]


if __name__ == "__main__":
    for s in generate(int(sys.argv[1]) if len(sys.argv) > 1 else 20, 1234, ["<|im_start|>"]):
        print(repr(s)[:160])
