"""Public entry points kept where users import them; the implementation lives in parity_both.tokenize."""

from parity_both.tokenize.vocab import ReferenceTokenizer, load_llama_vocab, tokenizer_from_gguf, tokenizer_json

__all__ = ["ReferenceTokenizer", "load_llama_vocab", "tokenizer_from_gguf", "tokenizer_json"]
