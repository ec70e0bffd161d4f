"""Comparison beyond the logits: where in the graph a lane departs from the reference (localize), and
whether each op the lane computed agrees with the model's meaning (kernels)."""
