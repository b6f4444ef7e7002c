"""Saving and loading quantized models (`native`), and export to serving formats (`export`)."""

from .native import is_saved_model, load_quantized, save_quantized, saved_model_dir

__all__ = ["is_saved_model", "load_quantized", "save_quantized", "saved_model_dir"]
