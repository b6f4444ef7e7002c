"""lowbit: low-bit quantization of weights, activations and KV cache for stock transformers LMs."""

from . import data
from .algorithms import (
    AWQConfig,
    GPTQConfig,
    RTNConfig,
    algorithm_names,
    register_algorithm,
)
from .algorithms.registry import AlgorithmResult, GroupContext
from .api import calibrate_static, check_scheme, quantize
from .arch import ArchSpec, InputGroup, MoESpec, register_arch
from .errors import UserError
from .evaluation import kv_cache_bytes, model_ops, model_size_bytes, perplexity
from .io import export_compressed_tensors, export_model, load_quantized, save_quantized
from .models import DEFAULT_MODEL, load_model
from .pipeline import PipelineConfig
from .qat import DatagenConfig, TrainConfig, freeze_student, generate_dataset, train
from .quant import QuantizedWeight
from .recipes import Recipe, load_recipe
from .runtime import QuantizationState, convert_to_int_kernels, quantization_state
from .scheme import Granularity, Observer, QuantArgs, Scheme, parse_scheme
from .transforms.apply import TransformConfig
from .version import __version__

__all__ = [
    "__version__",
    "AWQConfig",
    "AlgorithmResult",
    "ArchSpec",
    "DEFAULT_MODEL",
    "DatagenConfig",
    "GPTQConfig",
    "Granularity",
    "GroupContext",
    "InputGroup",
    "MoESpec",
    "Observer",
    "PipelineConfig",
    "QuantArgs",
    "QuantizationState",
    "QuantizedWeight",
    "RTNConfig",
    "Recipe",
    "Scheme",
    "TrainConfig",
    "TransformConfig",
    "UserError",
    "algorithm_names",
    "calibrate_static",
    "check_scheme",
    "convert_to_int_kernels",
    "data",
    "export_compressed_tensors",
    "export_model",
    "freeze_student",
    "generate_dataset",
    "kv_cache_bytes",
    "load_model",
    "load_quantized",
    "load_recipe",
    "model_ops",
    "model_size_bytes",
    "parse_scheme",
    "perplexity",
    "quantization_state",
    "quantize",
    "register_algorithm",
    "register_arch",
    "save_quantized",
    "train",
]
