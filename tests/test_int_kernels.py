"""Integer kernels against the fake-quantized reference (`QuantLinear`), layer by layer and whole models.

Tolerances, and why:
- int8 x int8 (`Int8Linear`): the integer products and int32 sums are exact; the reference sums the
  same dequantized products in fp32, so the two differ only by fp32 accumulation order and the fp32
  rounding of the recovered scales: relative error ~1e-7 per layer. We allow 1e-5 (relative
  Frobenius norm of the difference), which still fails on any off-by-one code or wrong scale.
- packed int4 (`Int4Linear`) computing in float32: the same, 1e-5.
- packed int4 in bfloat16 (the fast default): activations and scales are rounded to bfloat16
  (unit roundoff 2^-8 = 0.39%), the 4-bit codes stay exact; one layer's relative error is then
  about 0.4%, allowed 1%. Across a whole 2-layer model the rounding of every layer adds up: 5%.
- whole models with quantized activations or KV cache: a 1e-7 difference in one layer's output can
  move a value across a rounding boundary of the next quantizer, changing that code by one step
  (exactly what two fp32 implementations of the same fake-quant model do too). Such a flip changes
  the logits by far less than 1%, so whole W8A8 models are checked at 1% (and 1e-5 without flips).
"""

import pytest
import torch
from conftest import FAMILIES, tiny_model

import lowbit
from lowbit import QuantArgs, UserError
from lowbit.algorithms.rtn import rtn_weight
from lowbit.runtime import QuantLinear
from lowbit.runtime.int_linear import Int4Linear, Int8Linear, convert_to_int_kernels
from lowbit.scheme import Granularity

EXACT = 1e-5
FLIPS = 1e-2
BF16_LAYER, BF16_MODEL = 1e-2, 5e-2


def rel_err(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


def tokens(batch=2, length=24, seed=0):
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def quant_linear(out_f, in_f, w_args, a_args, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_f, in_f, generator=g)
    weight[:, :3] *= 6  # a few large input channels
    b = torch.randn(out_f, generator=g) if bias else None
    return QuantLinear(rtn_weight(weight, w_args), b, w_args, a_args)


def inputs(rows, in_f, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, rows, in_f, generator=g)
    x[..., 5] *= 20  # an outlier channel
    return x


W8, A8 = QuantArgs(bits=8), QuantArgs(bits=8, granularity=Granularity.TOKEN)


@torch.no_grad()
@pytest.mark.parametrize("shape", [(64, 96), (37, 53), (1536, 576)])
@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (4, 8), (4, 4)])
def test_int8_layer_equals_fake_quant(shape, w_bits, a_bits):
    ref = quant_linear(*shape, QuantArgs(bits=w_bits), QuantArgs(bits=a_bits, granularity=Granularity.TOKEN))
    layer = Int8Linear(ref)
    assert layer.weight_codes.dtype == torch.int8
    for rows in (1, 17):  # decode (one token) and prefill
        x = inputs(rows, shape[1])
        assert rel_err(layer(x), ref(x)) < EXACT
    assert rel_err(layer(x), torch.nn.functional.linear(x, ref.dense_weight(), ref.bias)) > 1e-4  # inputs really quantized


@torch.no_grad()
def test_int8_layer_per_tensor_weights_and_inputs():
    ref = quant_linear(40, 64, QuantArgs(bits=8, granularity=Granularity.TENSOR), QuantArgs(bits=8, granularity=Granularity.TENSOR))
    x = inputs(8, 64)
    assert rel_err(Int8Linear(ref)(x), ref(x)) < EXACT


@torch.no_grad()
def test_int8_layer_static_per_tensor_input():
    a_static = QuantArgs(bits=8, granularity=Granularity.TENSOR, dynamic=False)
    ref = quant_linear(48, 64, W8, a_static)
    ref.input_quant.observing = True
    ref(inputs(8, 64, seed=3))
    ref.input_quant.observing = False
    x = inputs(8, 64)
    assert rel_err(Int8Linear(ref)(x), ref(x)) < EXACT


@torch.no_grad()
@pytest.mark.parametrize(
    "w_args",
    [
        QuantArgs(bits=4),
        QuantArgs(bits=3),
        QuantArgs(bits=4, granularity=Granularity.GROUP, group_size=32),
        QuantArgs(bits=4, symmetric=False, granularity=Granularity.GROUP, group_size=64),
        QuantArgs(bits=4, symmetric=False),
        QuantArgs(bits=4, granularity=Granularity.TENSOR),
    ],
    ids=lambda a: a.name(),
)
def test_int4_layer_equals_fake_quant(w_args):
    ref = quant_linear(96, 128, w_args, None)
    x = inputs(9, 128)
    exact = Int4Linear(ref, torch.float32)
    fast = Int4Linear(ref)
    assert exact.weight_packed.dtype == torch.uint8 and exact.weight_packed.numel() == 96 * 128 // 2
    assert rel_err(exact(x), ref(x)) < EXACT
    assert rel_err(fast(x), ref(x)) < BF16_LAYER
    assert fast(x).dtype == torch.float32


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_models_agree_with_fake_quant(family):
    model = tiny_model(family)
    x = tokens()
    for scheme, compute, tol in (("W8A8KV8", None, FLIPS), ("W4A16", torch.float32, EXACT), ("W4g32A16", None, BF16_MODEL)):
        q = lowbit.quantize(model, scheme, progress=False)
        kwargs = {"int4_compute_dtype": compute} if compute else {}
        qi = convert_to_int_kernels(q, **kwargs)
        assert not any(isinstance(m, QuantLinear) for m in qi.modules())
        assert any(isinstance(m, QuantLinear) for m in q.modules())  # the input model is left as it was
        assert rel_err(qi(x).logits, q(x).logits) < tol, scheme


@torch.no_grad()
def test_incremental_decoding_matches():
    q = lowbit.quantize(tiny_model("llama"), "W8A8", progress=False)
    qi = convert_to_int_kernels(q)
    prompt = tokens(1, 8)
    ref = q.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(qi.generate(prompt, max_new_tokens=12, do_sample=False), ref)


@torch.no_grad()
@pytest.mark.parametrize("scheme", ["W8A8", "W4A16"])
def test_gptq_weights_convert(scheme):
    """GPTQ's error feedback can put a row's codes anywhere in [qmin, qmax]; the codes are still recovered."""
    model = tiny_model("qwen2")
    calib = [tokens(1, 32, seed=s) for s in range(4)]
    q = lowbit.quantize(model, scheme, algorithm="gptq", calibration=calib, progress=False)
    qi = convert_to_int_kernels(q, int4_compute_dtype=torch.float32)
    x = tokens()
    assert rel_err(qi(x).logits, q(x).logits) < (EXACT if scheme == "W4A16" else FLIPS)


@torch.no_grad()
def test_online_rotations_are_kept():
    from lowbit import TransformConfig

    model = tiny_model("llama")
    q = lowbit.quantize(model, "W8A8", transform=TransformConfig(kind="rotate", fuse_r1=False), progress=False)
    assert any(getattr(m, "input_rotation", None) is not None for m in q.modules() if isinstance(m, QuantLinear))
    x = tokens()
    assert rel_err(convert_to_int_kernels(q)(x).logits, q(x).logits) < FLIPS


@pytest.mark.parametrize(
    "scheme,needle",
    [
        ("W8aA8", "symmetric"),
        ("W8A8a", "symmetric"),
        ("W8g32A8", "per-group"),
        ("W8A16", "2-4 bit"),
        ("W4g16A16", "group sizes"),
        ("W16A8", "unquantized weights"),
    ],
)
def test_refuses_what_no_kernel_runs(scheme, needle):
    q = lowbit.quantize(tiny_model("llama"), scheme, progress=False)
    with pytest.raises(UserError, match=needle):
        convert_to_int_kernels(q)


def test_refuses_unquantized_model_and_latent_weights():
    model = tiny_model("llama")
    with pytest.raises(UserError, match="run lowbit.quantize first"):
        convert_to_int_kernels(model)
    student = lowbit.quantize(model, "W8A8", trainable=True, progress=False)
    with pytest.raises(UserError, match="freeze_student"):
        convert_to_int_kernels(student)


@torch.no_grad()
def test_full_range_grids_convert():
    """The 'f' grid (codes down to -2^(N-1)) is recovered like the restricted one."""
    ref = quant_linear(48, 64, QuantArgs(bits=8, full_range=True), QuantArgs(bits=8, granularity=Granularity.TOKEN, full_range=True))
    x = inputs(8, 64)
    assert rel_err(Int8Linear(ref)(x), ref(x)) < EXACT
    ref4 = quant_linear(48, 64, QuantArgs(bits=4, full_range=True), None)
    assert rel_err(Int4Linear(ref4, torch.float32)(x), ref4(x)) < EXACT
