"""Outlier and error analysis ("Turning LLM Activations Quantization-Friendly"): capture every decoder block's linear inputs, measure
layer-wise quantization error and quantization difficulty under each equivalent transformation,
find systematic and massive outliers, check eq. 8/9, plot and report."""

from .job import AnalysisConfig, analyze_model

__all__ = ["AnalysisConfig", "analyze_model"]
