"""Every captured node of a lane checked against the model's meaning: recomputed from the lane's own captured
sources with the reference's definition of the op and the parameters the model declares (issue 11).

    check_kernels(capture, model) -> the receipt's ``kernels`` section
    node_rows(capture, KernelModel) -> one row per node (NMSE, max |delta|, floor, verdict, parameter mismatches)
"""

from .check import SCHEMA, check_kernels, check_node, diagnosis, difference, node_rows, summarize
from .floors import DEFAULT_FLOOR, FLOORS, HONEST_WORST, MARGIN, floor_for, floor_key
from .model import KernelModel

__all__ = [
    "DEFAULT_FLOOR",
    "FLOORS",
    "HONEST_WORST",
    "MARGIN",
    "SCHEMA",
    "KernelModel",
    "check_kernels",
    "check_node",
    "diagnosis",
    "difference",
    "floor_for",
    "floor_key",
    "node_rows",
    "summarize",
]
