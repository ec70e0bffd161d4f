"""Public entry points kept where users import them; the implementation lives in parity_both.tokenize."""

from parity_both.tokenize.templates import detect, render

__all__ = ["detect", "render"]
