"""Weight quantization algorithms, each working on one layer."""

from .rtn import rtn_weight

ALGORITHMS = {"rtn": rtn_weight}

__all__ = ["ALGORITHMS", "rtn_weight"]
