"""Perplexity and cost accounting (size, OPs, KV-cache memory)."""

from .cost import kv_cache_bytes, model_ops, model_size_bytes, scheme_cost, stored_bytes, weight_bits
from .perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "kv_cache_bytes", "model_ops", "model_size_bytes", "perplexity", "scheme_cost", "stored_bytes", "weight_bits"]
