"""Saving and loading quantized models (`native`), and export to serving formats (`export`, with
`compressed_tensors_export` and `gguf_export`)."""

from .compressed_tensors_export import check_exportable, export_compressed_tensors
from .export import EXPORT_DTYPES, EXPORT_FORMATS, export_model
from .gguf_export import GGUF_TYPES, check_gguf_exportable, export_gguf
from .native import is_saved_model, load_quantized, save_quantized, saved_model_dir

__all__ = [
    "EXPORT_DTYPES",
    "EXPORT_FORMATS",
    "GGUF_TYPES",
    "check_exportable",
    "check_gguf_exportable",
    "export_compressed_tensors",
    "export_gguf",
    "export_model",
    "is_saved_model",
    "load_quantized",
    "save_quantized",
    "saved_model_dir",
]
