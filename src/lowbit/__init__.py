"""lowbit: low-bit quantization of weights, activations and KV cache for stock transformers LMs."""

__version__ = "0.1.0"

from .errors import UserError
from .evaluation import kv_cache_bytes, model_ops, model_size_bytes, perplexity
from .models import DEFAULT_MODEL, load_model
from .runtime import calibrate_static, quantize_model
from .scheme import Granularity, Observer, QuantArgs, Scheme, parse_scheme

quantize = quantize_model

__all__ = [
    "DEFAULT_MODEL",
    "Granularity",
    "Observer",
    "QuantArgs",
    "Scheme",
    "UserError",
    "calibrate_static",
    "kv_cache_bytes",
    "load_model",
    "model_ops",
    "model_size_bytes",
    "parse_scheme",
    "perplexity",
    "quantize",
    "quantize_model",
]
