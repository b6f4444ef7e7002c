"""Saving and loading quantized models (`native`), and export to serving formats (`export`)."""

from .export import EXPORT_FORMATS, check_exportable, export_compressed_tensors
from .native import is_saved_model, load_quantized, save_quantized, saved_model_dir

__all__ = [
    "EXPORT_FORMATS",
    "check_exportable",
    "export_compressed_tensors",
    "is_saved_model",
    "load_quantized",
    "save_quantized",
    "saved_model_dir",
]
