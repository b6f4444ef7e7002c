"""The jobs behind the CLI commands, as plain functions that return report dicts."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import torch
from torch import nn

from . import __version__
from .arch import decoder_layers, get_arch, head_dim, layer_linears
from .data import DEFAULT_DATA, calibration_batches, load_text, tokenize
from .evaluation import kv_cache_bytes, model_ops, model_size_bytes, perplexity
from .models import load_model
from .recipes import Recipe
from .runtime import check_scheme, quantize_model
from .scheme import Scheme
from .transforms.apply import check_transform

log = logging.getLogger("lowbit")

KV_CONTEXTS = (2048, 8192, 32768)


def cost_summary(model: nn.Module, scheme: Scheme | None, seq_len: int) -> dict:
    ops = model_ops(model, scheme, seq_len)
    return {
        "size_bytes": model_size_bytes(model),
        "ops": ops.ops,
        "macs": ops.macs,
        "ops_seq_len": seq_len,
        "kv_cache_bytes": {str(c): kv_cache_bytes(model.config, scheme, c) for c in KV_CONTEXTS},
    }


def quantize_job(
    model_name: str,
    recipe: Recipe,
    *,
    data: str | None = None,
    windows: int | None = 8,
    seq_len: int = 2048,
    calib: str | None = None,
    calib_samples: int = 32,
    calib_seq_len: int = 512,
    seed: int = 0,
    evaluate_fp: bool = True,
    progress: bool = True,
) -> dict:
    """Load, quantize and evaluate; returns the report (DESIGN.md §5)."""
    start = time.time()
    torch.manual_seed(seed)
    log.info("loading %s", model_name)
    model, tokenizer = load_model(model_name)
    spec = get_arch(model)
    check_scheme(model, spec, recipe.scheme)  # fail before the slow part
    check_transform(model, spec, recipe.transform)
    data_name = data or DEFAULT_DATA
    log.info("tokenizing evaluation text %s", data_name)
    eval_ids = tokenize(tokenizer, load_text(data, split="eval"))
    report: dict = {
        "lowbit_version": __version__,
        "model": model_name,
        "scheme": recipe.scheme.name,
        "scheme_args": recipe.scheme.to_dict(),
        "transform": recipe.transform.kind,
        "algorithm": recipe.algorithm,
    }
    if evaluate_fp:
        log.info("evaluating full precision")
        fp = perplexity(model, eval_ids, seq_len, windows, progress=progress, desc="perplexity FP")
        report["fp"] = {"ppl": fp.ppl, **cost_summary(model, None, seq_len)}
    calibration = None
    if recipe.scheme.needs_calibration or recipe.transform.needs_calibration:
        log.info("calibration text %s: %d samples x %d tokens", calib or DEFAULT_DATA, calib_samples, calib_seq_len)
        calibration = calibration_batches(tokenizer, calib, calib_samples, calib_seq_len, seed)
    log.info("quantizing to %s with %s", recipe.scheme.name, recipe.algorithm)
    t0 = time.time()
    qmodel = quantize_model(
        model, recipe.scheme, transform=recipe.transform, algorithm=recipe.algorithm, calibration=calibration, progress=progress
    )
    quant_seconds = time.time() - t0
    del model
    log.info("evaluating quantized model")
    q = perplexity(qmodel, eval_ids, seq_len, windows, progress=progress, desc="perplexity quantized")
    report["eval"] = {"data": data_name, "windows": q.windows, "seq_len": seq_len, "tokens": q.tokens}
    report["quantized"] = {"ppl": q.ppl, **cost_summary(qmodel, recipe.scheme, seq_len), "quantize_seconds": quant_seconds}
    report["transform_args"] = {**asdict(recipe.transform), **qmodel.lowbit_transform}
    report["seconds"] = time.time() - start
    return report


def evaluate_job(
    model_name: str, *, data: str | None = None, windows: int | None = 8, seq_len: int = 2048, progress: bool = True
) -> dict:
    start = time.time()
    model, tokenizer = load_model(model_name)
    get_arch(model)
    eval_ids = tokenize(tokenizer, load_text(data, split="eval"))
    fp = perplexity(model, eval_ids, seq_len, windows, progress=progress, desc="perplexity")
    return {
        "lowbit_version": __version__,
        "model": model_name,
        "eval": {"data": data or DEFAULT_DATA, "windows": fp.windows, "seq_len": seq_len, "tokens": fp.tokens},
        "fp": {"ppl": fp.ppl, **cost_summary(model, None, seq_len)},
        "seconds": time.time() - start,
    }


def info_job(model_name: str, scheme: Scheme | None = None) -> dict:
    model, _ = load_model(model_name)
    spec = get_arch(model)
    c = model.config
    layers = decoder_layers(model, spec)
    linears = list(layer_linears(layers[0], spec))
    params = sum(p.numel() for p in {p.data_ptr(): p for p in model.parameters()}.values())
    info = {
        "model": model_name,
        "family": spec.family,
        "model_type": c.model_type,
        "layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "attention_heads": c.num_attention_heads,
        "kv_heads": getattr(c, "num_key_value_heads", c.num_attention_heads),
        "head_dim": head_dim(c),
        "vocab_size": c.vocab_size,
        "tied_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
        "parameters": params,
        "linears_per_layer": linears,
    }
    if scheme is not None:
        touched = [f"{spec.layers}.{{0..{len(layers) - 1}}}.{n}" for n in linears] if (scheme.weights or scheme.inputs) else []
        if scheme.quantize_lm_head:
            touched.append(spec.lm_head)
        info["scheme"] = scheme.name
        info["quantized_linears"] = touched
        info["quantized_linear_count"] = len(layers) * len(linears) if touched else 0
        info["kv_quantized"] = bool(scheme.keys or scheme.values)
        info.update(cost_summary(quantize_model(model, scheme, progress=False), scheme, 2048) if not scheme.needs_calibration else {})
    return info

