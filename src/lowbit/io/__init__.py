"""Saving and loading quantized models (`native`), and export to serving formats (`export`)."""

from .compressed_tensors_export import check_exportable, export_compressed_tensors
from .export import EXPORT_DTYPES, EXPORT_FORMATS, export_model
from .native import is_saved_model, load_quantized, save_quantized, saved_model_dir

__all__ = [
    "EXPORT_DTYPES",
    "EXPORT_FORMATS",
    "check_exportable",
    "export_compressed_tensors",
    "export_model",
    "is_saved_model",
    "load_quantized",
    "save_quantized",
    "saved_model_dir",
]
