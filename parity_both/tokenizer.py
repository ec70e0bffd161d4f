"""Public entry points kept where users import them; the implementation lives in parity_both.tokenize."""

from parity_both.tokenize.rebuild import tokenizer_from_gguf, tokenizer_json
from parity_both.tokenize.reference import ReferenceTokenizer
from parity_both.tokenize.vocab import load_llama_vocab

__all__ = ["ReferenceTokenizer", "load_llama_vocab", "tokenizer_from_gguf", "tokenizer_json"]
