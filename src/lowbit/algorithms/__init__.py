"""Weight quantization algorithms. RTN works on a weight alone; GPTQ and AWQ need the layer's
calibration inputs and run inside the sequential pipeline (`lowbit.pipeline`)."""

from .rtn import rtn_weight

ALGORITHMS = ("rtn", "gptq", "awq")

__all__ = ["ALGORITHMS", "rtn_weight"]
