"""lowbit: low-bit quantization of weights, activations and KV cache for stock transformers LMs."""

__version__ = "0.1.0"

from . import data
from .algorithms.awq import AWQConfig
from .algorithms.gptq import GPTQConfig
from .errors import UserError
from .evaluation import kv_cache_bytes, model_ops, model_size_bytes, perplexity
from .io import export_compressed_tensors, load_quantized, save_quantized
from .models import DEFAULT_MODEL, load_model
from .pipeline import PipelineConfig
from .runtime import calibrate_static, quantize_model
from .scheme import Granularity, Observer, QuantArgs, Scheme, parse_scheme
from .transforms.apply import TransformConfig

quantize = quantize_model

__all__ = [
    "AWQConfig",
    "DEFAULT_MODEL",
    "GPTQConfig",
    "PipelineConfig",
    "TransformConfig",
    "Granularity",
    "Observer",
    "QuantArgs",
    "Scheme",
    "UserError",
    "calibrate_static",
    "data",
    "export_compressed_tensors",
    "kv_cache_bytes",
    "load_model",
    "load_quantized",
    "model_ops",
    "model_size_bytes",
    "parse_scheme",
    "perplexity",
    "quantize",
    "quantize_model",
    "save_quantized",
]
