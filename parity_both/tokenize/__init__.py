"""Tokenization exactly as llama.cpp does it, for the reference side of a comparison.

tables     llama.cpp's tokenizer tables as data (pre-tokenizer regexes and names, EOG and auto-detected texts)
vocab      a GGUF vocabulary read llama.cpp's way (LlamaVocab, load_llama_vocab, its EOG set)
regexes    llama.cpp's regexes as tokenizers' engine must see them
rebuild    the vocabulary rebuilt as a `tokenizers.Tokenizer` (tokenizer_from_gguf, tokenizer_json)
reference  ReferenceTokenizer (what the reference side encodes and decodes with) and the stop ids
authority  which tokenizer the reference uses, with hashes and fingerprints proving what it is
templates  prompt templates and the tokenization contract
llama_cpp  llama.cpp's own view through llama-cpp-python (for lanes and tests)
sources    where the test vocabularies live (llama.cpp's vocab-only GGUFs, the embedded model)
attrs      token attributes and kinds as llama.h defines them
"""
