"""Export a lowbit-quantized model to what serving engines load: one entry point, one format module
each (`compressed_tensors_export` for vLLM and transformers, `gguf_export` for llama.cpp).

Shared here: the dense dtype of the written tensors, and the checks every format makes first
(a quantized model, no weight still training, no online rotation the format cannot carry).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..runtime.experts import QuantExperts
from ..runtime.kv import QK_ROTATION
from ..runtime.linear import QuantLinear
from ..runtime.state import require_state
from ..scheme import Scheme

COMPRESSED_TENSORS, GGUF = "compressed-tensors", "gguf"
EXPORT_FORMATS = (COMPRESSED_TENSORS, GGUF)
# what the tensors that stay in floating point (embeddings, norms, unquantized linears) are written in
EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_DTYPES = {COMPRESSED_TENSORS: "bfloat16", GGUF: "float16"}


def export_dtype(name: str) -> torch.dtype:
    """The torch dtype of a `--dtype` name, or a UserError listing the choices."""
    if name not in EXPORT_DTYPES:
        raise UserError(f"unknown --dtype {name!r}; choose one of {', '.join(EXPORT_DTYPES)}")
    return EXPORT_DTYPES[name]


def check_export_format(fmt: str) -> str:
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"unknown export format {fmt!r}; available: {', '.join(EXPORT_FORMATS)}")
    return fmt


def quantized_linears(model: nn.Module, fmt: str) -> tuple[Scheme, dict[str, QuantLinear]]:
    """The model's scheme and its quantized linears, or a UserError for what no export can write."""
    scheme = require_state(model, "export").scheme
    if any(isinstance(m, QuantExperts) for m in model.modules()):
        raise UserError(
            f"cannot export a mixture-of-experts model to {fmt} yet: its experts are lowbit's per-expert linears, not the fused "
            "layout the format's loaders read; save it in lowbit's format instead (lowbit quantize --out)"
        )
    if scheme.weights is None:
        raise UserError(f"cannot export {scheme.name} to {fmt}: the export writes quantized weights; quantize the weights (e.g. W4A16)")
    check_no_prefix(scheme, fmt)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.weight_args is not None}
    trainable = [n for n, m in quantized.items() if not m.is_quantized]
    if trainable:
        raise UserError(f"cannot export: {trainable[0]} still trains a latent weight; call lowbit.qat.freeze_student(model) first")
    return scheme, quantized


def check_no_prefix(scheme: Scheme, fmt: str) -> None:
    """Full-precision prefix tokens (P<N>) are lowbit's own: no serving format can say that a
    sequence's first tokens skip activation and KV quantization."""
    if scheme.fp_prefix:
        raise UserError(
            f"cannot export {scheme.name} to {fmt}: the format cannot express full-precision prefix tokens (P{scheme.fp_prefix}); "
            "quantize without the P suffix to export, or save in lowbit's format (lowbit quantize --out)"
        )


def online_rotations(model: nn.Module) -> list[str]:
    """Modules that rotate their input (or queries and keys) at run time."""
    return [n for n, m in model.named_modules() if getattr(m, "input_rotation", None) is not None or getattr(m, QK_ROTATION, None) is not None]


def export_model(
    model: nn.Module, out: str | Path, tokenizer=None, *, fmt: str = COMPRESSED_TENSORS, dtype: str | None = None, overwrite: bool = False
) -> Path:
    """Write `model` (lowbit-quantized; not modified) to `out` in `fmt`, its unquantized tensors in
    `dtype` (default: bfloat16 for compressed-tensors, float16 for GGUF)."""
    check_export_format(fmt)
    dtype = dtype or DEFAULT_DTYPES[fmt]
    export_dtype(dtype)
    if fmt == GGUF:
        from .gguf_export import export_gguf

        return export_gguf(model, out, tokenizer, dtype=dtype, overwrite=overwrite)
    from .compressed_tensors_export import export_compressed_tensors

    return export_compressed_tensors(model, out, tokenizer, dtype=dtype, overwrite=overwrite)
