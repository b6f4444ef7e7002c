"""Text for evaluation and calibration."""

from .text import DEFAULT_DATA, calibration_batches, load_text, tokenize

__all__ = ["DEFAULT_DATA", "calibration_batches", "load_text", "tokenize"]
