"""Saving and loading quantized models (`native`), and export to serving formats (`export`, `gguf_export`)."""

from .export import EXPORT_FORMATS, check_exportable, export_compressed_tensors
from .gguf_export import GGUF_TYPES, check_gguf_exportable, export_gguf
from .native import is_saved_model, load_quantized, save_quantized, saved_model_dir

__all__ = [
    "EXPORT_FORMATS",
    "GGUF_TYPES",
    "check_exportable",
    "check_gguf_exportable",
    "export_compressed_tensors",
    "export_gguf",
    "is_saved_model",
    "load_quantized",
    "save_quantized",
    "saved_model_dir",
]
