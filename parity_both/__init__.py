"""parity-both: prove (or disprove) that llama.cpp-family engines compute what an independent
NumPy reference computes, token for token and logit for logit."""

__version__ = "0.1.0"
