"""Export to the compressed-tensors format (what vLLM and transformers load), with the
`compressed-tensors` library.

What can be expressed, and so exported:
- weights: 4- or 8-bit, symmetric, per channel or per group (any lowbit algorithm and observer:
  the stored codes and scales are the model's own `QuantizedWeight`);
- activations: none (W4A16, W8A16), or 8-bit symmetric dynamic per token on the full signed range
  (W8A8f: scale max/127.5, as compressed-tensors computes it at run time);
- transforms whose edits are all folded into the weights: smooth, and rotate with only R1
  (fused; r2, r3 and r4 off, as they rotate online).

Refused, with the reason: asymmetric weights (lowbit's offset is the real-valued row minimum,
compressed-tensors stores an integer zero point), other bit widths, static / per-tensor /
clipped / 4-bit activations, KV-cache quantization, and online rotations (they run inside the
model at inference time; this export writes weights and a quantization config only).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..arch import get_arch
from ..errors import UserError
from ..files import write_dir_atomically
from ..runtime.kv import KEY_QUANT, QK_ROTATION, VALUE_QUANT
from ..runtime.linear import QuantLinear
from ..runtime.state import require_state
from ..scheme import Granularity, Observer, QuantArgs, Scheme

log = logging.getLogger("lowbit")

COMPRESSED_TENSORS = "compressed-tensors"
EXPORT_FORMATS = (COMPRESSED_TENSORS,)
WEIGHT_BITS = (4, 8)


def check_exportable(model: nn.Module) -> Scheme:
    """The model's scheme, or a UserError that says what compressed-tensors cannot express."""
    scheme = require_state(model, "export").scheme
    name = scheme.name
    w, a = scheme.weights, scheme.inputs
    if w is None:
        raise UserError(f"cannot export {name}: compressed-tensors export needs quantized weights (W4A16, W8A16 or W8A8)")
    if any(args is not None and args.is_float for args in (w, a, scheme.keys, scheme.values)):
        raise UserError(
            f"cannot export {name}: the compressed-tensors export writes integer formats so far; FP8, MXFP and NVFP4 "
            "models are saved and evaluated by lowbit (lowbit quantize --out), their export is not written yet"
        )
    if w.bits not in WEIGHT_BITS:
        raise UserError(f"cannot export {name}: {w.bits}-bit weights; the export writes 4- and 8-bit weights (what vLLM's int kernels run)")
    if not w.symmetric:
        raise UserError(
            f"cannot export {name}: asymmetric weights; lowbit's offset is the real-valued row minimum, compressed-tensors "
            "stores an integer zero point (use symmetric weights, e.g. W4g64 instead of W4g64a)"
        )
    if a is not None:
        if a.bits != 8 or w.bits != 8:
            raise UserError(f"cannot export {name}: activations must be 16 bit (W4A16, W8A16) or 8 bit with 8-bit weights (W8A8)")
        if w.granularity is not Granularity.CHANNEL:
            raise UserError(f"cannot export {name}: W8A8 needs per-channel weights (int8 matmul kernels scale whole output channels)")
        if not a.dynamic or a.granularity is not Granularity.TOKEN:
            raise UserError(f"cannot export {name}: activations must be dynamic per token (A8), not static, per-tensor or per-group")
        if not a.symmetric or a.clip_ratio != 1.0 or a.observer is not Observer.MINMAX:
            raise UserError(f"cannot export {name}: activations must be symmetric MinMax without clipping (A8f); the engine computes their scales")
        if not a.full_range:
            raise UserError(
                f"cannot export {name}: compressed-tensors quantizes activations over the full signed range (scale max/127.5, "
                "lowbit's A8f), lowbit's A8 uses max/127; quantize with A8f (e.g. --scheme W8A8f) so the export computes what lowbit evaluated"
            )
    if scheme.keys is not None or scheme.values is not None:
        raise UserError(
            f"cannot export {name}: lowbit's per-token integer KV cache has no compressed-tensors equivalent (its KV-cache "
            "scheme is static per tensor or head, FP8 in vLLM); quantize without KV (e.g. W8A8 instead of W8A8KV8)"
        )
    rotated = [n for n, m in model.named_modules() if getattr(m, "input_rotation", None) is not None or getattr(m, QK_ROTATION, None) is not None]
    if rotated:
        raise UserError(
            f"cannot export: {len(rotated)} modules rotate their input online (e.g. {rotated[0]}); online Hadamard rotations "
            "run inside the model at inference and this export writes weights only (transform 'smooth' exports, and 'rotate' "
            "fused and R3/R4 off, exports)"
        )
    for n, m in model.named_modules():
        if getattr(m, KEY_QUANT, None) is not None or getattr(m, VALUE_QUANT, None) is not None:
            raise UserError(f"cannot export: {n} quantizes its KV cache")
    return scheme


def _ct_args(args: QuantArgs, weights: bool):
    from compressed_tensors.quantization import QuantizationArgs

    if weights:
        strategy = {Granularity.CHANNEL: "channel", Granularity.GROUP: "group", Granularity.TENSOR: "tensor"}[args.granularity]
        return QuantizationArgs(num_bits=args.bits, type="int", symmetric=True, strategy=strategy, group_size=args.group_size, dynamic=False)
    return QuantizationArgs(num_bits=args.bits, type="int", symmetric=True, strategy="token", dynamic=True)


def _plain_model(model: nn.Module) -> nn.Module:
    """A stock transformers model (nn.Linear everywhere) with `model`'s weights, built from its config."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    base = (model.config._attn_implementation or "eager").removeprefix("lowbit_")
    dtype = next(model.parameters()).dtype
    with no_init_weights():
        plain = AutoModelForCausalLM.from_config(model.config, dtype=dtype, attn_implementation=base)
    plain.tie_weights()  # no_init_weights skips tying; a tied lm_head would be written twice
    wanted = plain.state_dict()
    state = {k: v for k, v in model.state_dict().items() if k in wanted}
    for name, module in model.named_modules():  # quantized linears hold codes: their dequantized weight
        if isinstance(module, QuantLinear) and module.is_quantized:
            state[f"{name}.weight"] = module.dense_weight(dtype)
    plain.load_state_dict(state, strict=True)
    return plain.eval()


def export_compressed_tensors(model: nn.Module, out: str | Path, tokenizer=None, *, overwrite: bool = False) -> Path:
    """Write `model` (a lowbit-quantized model; not modified) as a compressed-tensors checkpoint
    that `AutoModelForCausalLM.from_pretrained(out)` and vLLM load. Returns `out`."""
    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import (
            QuantizationConfig,
            QuantizationScheme,
            apply_quantization_config,
        )
    except ImportError:
        raise UserError("export needs the compressed-tensors package: pip install 'lowbit[export]'") from None
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it or choose another folder")
    get_arch(model)
    scheme = check_exportable(model)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.weight_args is not None}
    trainable = [n for n, m in quantized.items() if not m.is_quantized]
    if trainable:
        raise UserError(f"cannot export: {trainable[0]} still trains a latent weight; call lowbit.qat.freeze_student(model) first")
    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))]
    ignore = [n for n in linears if n not in quantized]
    codes = {name: module.quantized_weight for name, module in quantized.items()}
    group = QuantizationScheme(
        targets=["Linear"],
        weights=_ct_args(scheme.weights, weights=True),
        input_activations=_ct_args(scheme.inputs, weights=False) if scheme.inputs is not None else None,
    )
    config = QuantizationConfig(config_groups={"group_0": group}, ignore=ignore, quantization_status="frozen")
    log.info("exporting %s to compressed-tensors in %s", scheme.name, out)
    plain = _plain_model(model)
    apply_quantization_config(plain, config)
    with torch.no_grad():
        for name, c in codes.items():
            target = plain.get_submodule(name)
            target.weight_scale.data = c.qparams.scale.reshape(target.weight.shape[0], -1).to(target.weight.dtype)
            if hasattr(target, "weight_zero_point"):
                target.weight_zero_point.data = torch.zeros_like(target.weight_scale, dtype=target.weight_zero_point.dtype)
    compressor = ModelCompressor.from_pretrained_model(plain)
    compressor.compress_model(plain)

    def fill(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        compressor.update_config(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    write_dir_atomically(out, fill, overwrite=overwrite)
    return out
