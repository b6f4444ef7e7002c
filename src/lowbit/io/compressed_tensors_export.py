"""Export to the compressed-tensors format (what vLLM and transformers load), written with the
`compressed-tensors` library.

The rule: what lowbit evaluated is what vLLM computes. Every recipe the format and vLLM can
express is written; anything else is refused with the reason and the scheme that would export.

- Weights: integer 4 / 8 bit symmetric, per channel or per group (any algorithm: the codes and
  scales are the model's own `QuantizedWeight`); FP8 E4M3 per channel or per tensor; NVFP4; MXFP4;
  MXFP8. vLLM's weight-only integer kernels hold the scales in the served dtype, so their scales
  must be exactly representable in `--dtype` (quantize with `b` / `h` scales, e.g. W4g128b).
- Activations: none; int8 symmetric, dynamic per token with scale max/127 (lowbit's `A8`: what
  vLLM's CPU and GPU int8 kernels compute; transformers' reference path of the format uses
  max/127.5, lowbit's `A8f`) or static per tensor (`A8s`); FP8 dynamic per token (`Afp8`) or
  static per tensor (`Afp8s`); NVFP4 with a calibrated per-tensor global scale (`Anvfp4s`). MX
  activations are refused: the engine computes their scales with compressed-tensors' rule, not
  the OCP floor lowbit uses.
- KV cache: FP8 E4M3 with one static scale per tensor (`KVfp8s`), the only quantized KV cache vLLM
  serves; integer KV caches are not servable there.
- Transforms whose edits are folded into the weights (smoothing, R1 fused). Online rotations
  (online R1, R2's online part, R3, R4) are refused: transformers ignores compressed-tensors'
  transform configuration on load, and vLLM applies none inside attention.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from ..arch import attention_modules, get_arch
from ..errors import UserError
from ..files import write_dir_atomically
from ..quant.fake import range_global_scale, range_qparams
from ..runtime.kv import KEY_QUANT, VALUE_QUANT
from ..runtime.linear import QuantLinear
from ..scheme import Granularity, Observer, QuantArgs, Scheme
from .export import COMPRESSED_TENSORS, export_dtype, online_rotations, quantized_linears

log = logging.getLogger("lowbit")

INT_WEIGHT_BITS = (4, 8)
# parameters compressed-tensors adds to a quantized module; everything else is a dense tensor
QUANT_PARAMS = (
    "weight_scale",
    "weight_zero_point",
    "weight_global_scale",
    "weight_shape",
    "weight_packed",
    "input_scale",
    "input_zero_point",
    "input_global_scale",
    "k_scale",
    "v_scale",
)


def _refuse(scheme: Scheme, why: str) -> UserError:
    return UserError(f"cannot export {scheme.name} to compressed-tensors: {why}")


def _check_weights(scheme: Scheme) -> None:
    w, a = scheme.weights, scheme.inputs
    if w.element == "int":
        if w.bits not in INT_WEIGHT_BITS:
            raise _refuse(scheme, f"{w.bits}-bit weights; vLLM's integer kernels run 4- and 8-bit weights (e.g. W4g128b)")
        if not w.symmetric:
            raise _refuse(
                scheme,
                "asymmetric weights; lowbit's offset is the real-valued row minimum, compressed-tensors stores an integer "
                "zero point (use symmetric weights, e.g. W4g128b instead of W4g128ab)",
            )
        if w.granularity is Granularity.TENSOR:
            raise _refuse(scheme, "per-tensor integer weights; use per channel (W8A8) or per group (W4g128b)")
        return
    if w.element == "fp8_e5m2":
        raise _refuse(scheme, "FP8 E5M2 weights; vLLM's FP8 kernels take E4M3 (use Wfp8)")
    if w.element == "fp8_e4m3" and w.scale_format == "float32":
        if w.granularity is Granularity.GROUP:
            raise _refuse(scheme, "FP8 weights per group of the input; vLLM's FP8 layouts are per channel or per tensor (Wfp8 or Wfp8t)")
        return
    if w.format_name in ("nvfp4", "mxfp4", "mxfp8"):
        if a is not None and a.format_name != w.format_name:
            raise _refuse(scheme, f"{w.format_name} weights run with 16-bit or {w.format_name} activations in vLLM")
        return
    raise _refuse(scheme, f"weights in {w.format_name} with {w.scale_format} scales have no compressed-tensors layout")


def _check_inputs(scheme: Scheme) -> None:
    w, a = scheme.weights, scheme.inputs
    if a is None:
        return
    if a.clip_ratio != 1.0 or a.observer is not Observer.MINMAX or not a.symmetric:
        raise _refuse(scheme, "activations must be symmetric MinMax without clipping; the engine computes their scales itself")
    if a.element == "int":
        if a.bits != 8 or w.element != "int" or w.bits != 8 or w.granularity is not Granularity.CHANNEL:
            raise _refuse(scheme, "integer activations run in vLLM as W8A8: 8-bit per-channel weights, 8-bit activations (W8A8)")
        if a.full_range:
            raise _refuse(
                scheme,
                "vLLM's int8 kernels quantize activations with scale max/127 (lowbit's A8), not max/127.5 (A8f, transformers' "
                "reference path); quantize with A8 (e.g. W8A8) so the export computes what lowbit evaluated",
            )
        if a.granularity not in (Granularity.TOKEN, Granularity.TENSOR) or a.scale_format != "float32":
            raise _refuse(scheme, "int8 activations are dynamic per token (A8) or static per tensor (A8s), with float32 scales")
        return
    if a.element == "fp8_e4m3" and a.format_name == "fp8":
        if w.element != "fp8_e4m3" or w.format_name != "fp8":
            raise _refuse(scheme, "FP8 activations run in vLLM with FP8 weights (Wfp8Afp8)")
        if a.granularity not in (Granularity.TOKEN, Granularity.TENSOR) or a.scale_format != "float32":
            raise _refuse(scheme, "FP8 activations are dynamic per token (Afp8) or static per tensor (Afp8s), with float32 scales")
        return
    if a.format_name == "nvfp4":
        if a.dynamic:
            raise _refuse(scheme, "vLLM's NVFP4 kernels take one calibrated global activation scale per tensor, not one per token: use Anvfp4s")
        return
    if a.format_name in ("mxfp4", "mxfp8"):
        raise _refuse(
            scheme,
            "the engine computes MX activation scales itself, and compressed-tensors rounds a block maximum's exponent up "
            "from significand 1.75 where lowbit follows the OCP MX floor rule: export MX weights with 16-bit activations "
            f"(W{w.format_name}A16)",
        )
    raise _refuse(scheme, f"activations in {a.format_name} have no compressed-tensors layout that vLLM runs")


def _check_kv(scheme: Scheme) -> None:
    k, v = scheme.keys, scheme.values
    if k is None and v is None:
        return
    fp8_static = [args is not None and args.format_name == "fp8" and not args.dynamic and args.clip_ratio == 1.0 for args in (k, v)]
    if not all(fp8_static) or k != v:
        raise _refuse(
            scheme,
            "vLLM's quantized KV cache is FP8 E4M3 with one static scale per tensor for keys and values (KVfp8s); integer and "
            "per-token KV caches are not servable in vLLM (drop the KV part, or use KVfp8s)",
        )


def _check_scales_fit(scheme: Scheme, quantized: dict[str, QuantLinear], dtype: str) -> None:
    """vLLM's weight-only integer kernels hold the scales in the served dtype: they must be exact there."""
    w = scheme.weights
    if w.element != "int" or scheme.inputs is not None or dtype == "float32":
        return
    target = export_dtype(dtype)
    for name, module in quantized.items():
        scale = module.weight_scale
        if not torch.equal(scale.to(target).to(scale.dtype), scale):
            suffix = {"bfloat16": "b", "float16": "h"}[dtype]
            raise _refuse(
                scheme,
                f"{name}'s scales are {w.scale_format}, and vLLM's weight-only kernels hold scales in the served dtype {dtype}; "
                f"quantize with {dtype} scales (the '{suffix}' suffix, e.g. W{w.bits}g128{suffix}) or export with --dtype float32",
            )


def check_exportable(model: nn.Module, dtype: str = "bfloat16") -> Scheme:
    """The model's scheme, or a UserError that says what compressed-tensors (as vLLM runs it) cannot express."""
    return _checked(model, dtype)[0]


def _checked(model: nn.Module, dtype: str) -> tuple[Scheme, dict[str, QuantLinear]]:
    """`check_exportable`, also returning the quantized linears it checked."""
    scheme, quantized = quantized_linears(model, COMPRESSED_TENSORS)
    _check_weights(scheme)
    _check_inputs(scheme)
    _check_kv(scheme)
    rotated = online_rotations(model)
    if rotated:
        raise UserError(
            f"cannot export: {len(rotated)} modules rotate their input online (e.g. {rotated[0]}); transformers does not apply "
            "compressed-tensors' transform configuration when it loads a checkpoint (it would run the model without them) and "
            "vLLM 0.32 applies none inside attention (R3): export rotations fused into the weights (a recipe with transform "
            "'rotate' and r2, r3, r4: false), or smoothing"
        )
    _check_scales_fit(scheme, quantized, dtype)
    return scheme, quantized


def _ct_args(args: QuantArgs, role: str):
    """compressed-tensors' QuantizationArgs for lowbit's `args` (weights, input_activations or kv)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.quant_scheme import MXFP4, MXFP8, NVFP4

    if args.format_name in ("nvfp4", "mxfp4", "mxfp8"):
        preset = {"nvfp4": NVFP4, "mxfp4": MXFP4, "mxfp8": MXFP8}[args.format_name]
        return preset[role].model_copy()
    kind = "int" if args.element == "int" else "float"
    if role == "weights":
        strategy = {Granularity.CHANNEL: "channel", Granularity.GROUP: "group", Granularity.TENSOR: "tensor"}[args.granularity]
        return QuantizationArgs(num_bits=args.bits, type=kind, symmetric=True, strategy=strategy, group_size=args.group_size, dynamic=False)
    strategy = "tensor" if args.granularity is Granularity.TENSOR else "token"
    return QuantizationArgs(num_bits=args.bits, type=kind, symmetric=True, strategy=strategy, dynamic=args.dynamic)


def _plain_model(model: nn.Module) -> nn.Module:
    """A stock transformers model (nn.Linear everywhere) in float32 with `model`'s weights."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = copy.deepcopy(model.config)  # from_config sets the attention implementation on the config it is given
    base = (config._attn_implementation or "eager").removeprefix("lowbit_")
    with no_init_weights():
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=base)
    plain.tie_weights()  # no_init_weights skips tying; a tied lm_head would be written twice
    wanted = plain.state_dict()
    state = {k: v.float() for k, v in model.state_dict().items() if k in wanted}
    for name, module in model.named_modules():  # quantized linears hold codes: their dequantized weight
        if isinstance(module, QuantLinear) and module.is_quantized:
            state[f"{name}.weight"] = module.dense_weight(torch.float32)
    plain.load_state_dict(state, strict=True)
    return plain.eval()


def _static_scales(quantizer, args: QuantArgs) -> dict[str, torch.Tensor]:
    """The calibrated scale of a static quantizer as compressed-tensors names it."""
    lo, hi = quantizer.observed_min, quantizer.observed_max
    if args.global_scale is not None:
        return {"global_scale": range_global_scale(lo, hi, args).reshape(1)}
    return {"scale": range_qparams(lo, hi, args).scale.reshape(1).float()}


@torch.no_grad()
def _set_qparams(plain: nn.Module, model: nn.Module, quantized: dict[str, QuantLinear], scheme: Scheme) -> None:
    """Give compressed-tensors' parameters lowbit's own codes' scales and calibrated ranges."""
    for name, module in quantized.items():
        target = plain.get_submodule(name)
        scale = module.weight_scale.reshape(target.weight_scale.shape)  # the scales the codes were made with
        # MX scales: compressed-tensors holds their value (a power of two) until it compresses them to E8M0 bits
        target.weight_scale.data = scale.float() if module.weight_args.scale_format == "e8m0" else scale.to(target.weight_scale.dtype)
        if hasattr(target, "weight_zero_point"):
            target.weight_zero_point.data = torch.zeros_like(target.weight_zero_point)
        if module.weight_global_scale is not None:
            target.weight_global_scale.data = module.weight_global_scale.reshape(target.weight_global_scale.shape).float().clone()
        a = scheme.inputs
        if a is not None and not a.dynamic:
            for key, value in _static_scales(module.input_quant, a).items():
                getattr(target, f"input_{key}").data = value.to(getattr(target, f"input_{key}").dtype)
    if scheme.keys is not None:
        # written by hand: compressed-tensors 0.20 attaches its KV-cache parameters only to attention
        # modules whose forward takes `past_key_values`, which transformers 5 renamed
        spec = get_arch(model)
        for ours, theirs in zip(attention_modules(model, spec), attention_modules(plain, spec)):
            for attr, name in ((KEY_QUANT, "k_scale"), (VALUE_QUANT, "v_scale")):
                scale = _static_scales(getattr(ours, attr), scheme.keys)["scale"]
                theirs.register_parameter(name, nn.Parameter(scale.reshape(()), requires_grad=False))


@torch.no_grad()
def _to_dtype(plain: nn.Module, scheme: Scheme, dtype: torch.dtype) -> None:
    """Dense tensors in `dtype`; weight-only integer scales too (vLLM holds them in the served dtype,
    and `_check_scales_fit` made sure they are exact there); other quantization parameters as stored."""
    int_weight_only = scheme.weights.element == "int" and scheme.inputs is None
    for name, tensor in [*plain.named_parameters(), *plain.named_buffers()]:
        if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            continue
        leaf = name.rpartition(".")[2]
        if leaf in QUANT_PARAMS and not (int_weight_only and leaf == "weight_scale"):
            continue
        tensor.data = tensor.data.to(dtype)
    plain.config.dtype = dtype


def export_compressed_tensors(model: nn.Module, out: str | Path, tokenizer=None, *, dtype: str = "bfloat16", overwrite: bool = False) -> Path:
    """Write `model` (a lowbit-quantized model; not modified) as a compressed-tensors checkpoint
    that `AutoModelForCausalLM.from_pretrained(out)` and vLLM load, its dense tensors in `dtype`.
    Returns `out`."""
    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config
    except ImportError:
        raise UserError("export needs the compressed-tensors package: pip install 'lowbit[export]'") from None
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it or choose another folder")
    torch_dtype = export_dtype(dtype)
    get_arch(model)
    scheme, quantized = _checked(model, dtype)
    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))]
    group = QuantizationScheme(
        targets=["Linear"],
        weights=_ct_args(scheme.weights, "weights"),
        input_activations=_ct_args(scheme.inputs, "input_activations") if scheme.inputs is not None else None,
    )
    config = QuantizationConfig(
        config_groups={"group_0": group},
        ignore=[n for n in linears if n not in quantized],
        kv_cache_scheme=_ct_args(scheme.keys, "kv") if scheme.keys is not None else None,
        quantization_status="frozen",
    )
    log.info("exporting %s to compressed-tensors in %s (dense tensors in %s)", scheme.name, out, dtype)
    plain = _plain_model(model)
    apply_quantization_config(plain, config)
    _set_qparams(plain, model, quantized, scheme)
    compressor = ModelCompressor.from_pretrained_model(plain)
    if config.kv_cache_scheme is not None:  # not found on the modules (see `_set_qparams`): say it
        compressor.quantization_config.kv_cache_scheme = config.kv_cache_scheme
    compressor.compress_model(plain)
    _to_dtype(plain, scheme, torch_dtype)

    def fill(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        compressor.update_config(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    write_dir_atomically(out, fill, overwrite=overwrite)
    return out
