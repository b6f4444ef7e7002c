"""Floating-point and microscaling formats: value sets, rounding, scales, agreement with torch's
casts and compressed-tensors' quantizers, storage, and the formats on models."""

import pytest
import torch
from conftest import tiny_model

import lowbit
from lowbit.errors import UserError
from lowbit.quant import fake_quantize
from lowbit.quant.formats import FP4_E2M1, FP8_E4M3, FP8_E5M2, e8m0_scale
from lowbit.quant.qweight import QuantizedWeight, quantize_weight
from lowbit.scheme import parse_scheme

torch.manual_seed(0)


def random_tensor(shape, outliers: bool, seed: int = 0) -> torch.Tensor:
    """Gaussian values, or heavy-tailed ones with a few outlier channels (activations' shape)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    if outliers:
        x = x * torch.exp(torch.randn(*shape, generator=g))
        x[..., 3] *= 80
        x[..., -7] *= -30
    return x


# ---------------------------------------------------------------- element formats by hand


def test_value_sets():
    assert FP4_E2M1.magnitudes.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    e4m3 = FP8_E4M3.magnitudes
    assert e4m3.numel() == 127 and e4m3[-1] == 448 and e4m3[1] == 2.0**-9 and e4m3[8] == 2.0**-6  # 0b1111_111 is NaN
    assert e4m3[-2] == 416 and e4m3[(8 << 3) - 1 + 1] == 2.0 ** (8 - 7)  # the first normal of exponent field 8 is 2^1
    e5m2 = FP8_E5M2.magnitudes
    assert e5m2.numel() == 124 and e5m2[-1] == 57344 and e5m2[1] == 2.0**-16  # exponent field 31 is inf / NaN
    assert FP4_E2M1.bits == 4 and FP8_E4M3.bits == 8 and FP4_E2M1.max_exponent == 2 and FP8_E4M3.max_exponent == 8


def test_e2m1_rounds_to_nearest_ties_to_even_and_saturates():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.26, 2.49, 6.5, 7.0, 1e9])
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.5, 2.0, 6.0, 6.0, 6.0]
    assert FP4_E2M1.round(x).tolist() == expected
    assert FP4_E2M1.round(-x).tolist() == [-v for v in expected]


def test_e4m3_ties_saturation_and_subnormals():
    tiny = 2.0**-9  # the smallest subnormal
    x = torch.tensor([464.0, 465.0, 1e6, 0.5 * tiny, 1.5 * tiny, 2.5 * tiny, 1.0 + 2**-4, 1.0 + 3 * 2**-4, 240.0 + 8])
    # 464 is halfway between 448 and (the NaN pattern) 480: saturates; 1 + 1/16 is halfway between 1 and
    # 1.125 (mantissa 000 vs 001): 1; 1 + 3/16: 1.25 (even); 248 halfway between 240 (110) and 256: 256
    expected = [448.0, 448.0, 448.0, 0.0, 2 * tiny, 2 * tiny, 1.0, 1.25, 256.0]
    assert FP8_E4M3.round(x).tolist() == expected


@pytest.mark.parametrize("fmt", [FP8_E4M3, FP8_E5M2], ids=lambda f: f.name)
@pytest.mark.parametrize("outliers", [False, True])
def test_fp8_rounding_matches_torch_casts(fmt, outliers):
    x = random_tensor((256, 512), outliers) * (3 if outliers else 40)
    mids = (fmt.magnitudes[1:] + fmt.magnitudes[:-1]) / 2  # exact ties too
    x = torch.cat([x.reshape(-1), mids.float(), -mids.float(), torch.tensor([fmt.max * 1.2, -fmt.max * 3])])
    ours = fmt.round(x)
    theirs = x.clamp(-fmt.max, fmt.max).to(fmt.torch_dtype).float()
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("fmt", [FP4_E2M1, FP8_E4M3, FP8_E5M2], ids=lambda f: f.name)
def test_codes_are_bit_patterns_and_round_trip(fmt):
    values = torch.cat([fmt.magnitudes.float(), -fmt.magnitudes[1:].float()])
    codes = fmt.encode(values)
    assert torch.equal(fmt.decode(codes), values)
    if fmt.torch_dtype is not None:  # the same bit patterns torch stores
        assert torch.equal(codes.to(torch.uint8), values.to(fmt.torch_dtype).view(torch.uint8))
    if fmt is FP4_E2M1:  # sign bit on top: -6 = 0b1111, 6 = 0b0111, -0.5 = 0b1001
        assert fmt.encode(torch.tensor([-6.0, 6.0, -0.5])).tolist() == [15, 7, 9]


# ---------------------------------------------------------------- scales


def test_e8m0_scale_is_the_mx_specification_formula():
    amax = torch.tensor([6.0, 7.9, 8.0, 0.3, 1.0, 0.0, 448.0, 500.0])
    # X = 2^(floor(log2 amax) - emax_elem), emax 2 for E2M1 and 8 for E4M3
    assert e8m0_scale(amax, FP4_E2M1).tolist() == [1.0, 1.0, 2.0, 2.0**-4, 0.25, 1.0, 2.0**6, 2.0**6]
    assert e8m0_scale(amax, FP8_E4M3).tolist() == [2.0**-6, 2.0**-6, 2.0**-5, 2.0**-10, 2.0**-8, 1.0, 1.0, 1.0]
    # a block's maximum above the element's range saturates: 7.9 / 1 -> 6
    q = quantize_weight(torch.tensor([[7.9] + [0.0] * 31]), parse_scheme("Wmxfp4A16").weights)
    assert q.dequantize()[0, 0] == 6.0


def test_nvfp4_two_level_scales_by_hand():
    args = parse_scheme("Wnvfp4A16").weights
    w = torch.zeros(2, 16)
    w[0, 0] = 2688.0  # 448 * 6: global scale 1, block scale 448
    w[1, :3] = torch.tensor([3.0, 1.3, -0.2])  # block scale e4m3(3 / 6) = 0.5: 6, 2.6 -> 3, -0.4 -> -0.5
    q = quantize_weight(w, args)
    assert q.global_scale.item() == 1.0
    assert q.scale.float().reshape(-1).tolist() == [448.0, 0.5]
    assert q.dequantize()[1, :3].tolist() == [3.0, 1.5, -0.25]
    # a smaller tensor: global 2688 / amax, each block scale amax_b / 6 * global rounded to E4M3
    w = w / 1000
    q = quantize_weight(w, args)
    assert q.global_scale.item() == pytest.approx(1000.0)
    assert q.scale.float().reshape(-1)[1].item() == FP8_E4M3.round(torch.tensor(0.003 / 6 * q.global_scale.item())).item()


# ---------------------------------------------------------------- agreement with compressed-tensors


def _ct():
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake
    from compressed_tensors.quantization.quant_scheme import FP8, MXFP4A16, NVFP4A16
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    return ct_fake, calculate_qparams, generate_gparam, {"nvfp4": NVFP4A16, "mxfp4": MXFP4A16, "fp8": FP8}


@pytest.mark.parametrize("outliers", [False, True])
def test_nvfp4_matches_compressed_tensors(outliers):
    ct_fake, calculate_qparams, generate_gparam, presets = _ct()
    w = random_tensor((96, 256), outliers, seed=1)
    args = presets["nvfp4"]["weights"]
    g = generate_gparam(w.min(), w.max())
    blocks = w.reshape(96, 16, 16)
    scale, zero = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args, global_scale=g)
    q = quantize_weight(w, parse_scheme("Wnvfp4A16").weights)
    assert q.global_scale.item() == g.item()
    assert torch.equal(q.scale.float().reshape(96, 16), scale.float())
    assert torch.equal(q.dequantize(), ct_fake(w, scale, zero, args, global_scale=g))


@pytest.mark.parametrize("outliers", [False, True])
def test_mxfp4_matches_compressed_tensors(outliers):
    """Elements agree exactly on the same scales. Scales: compressed-tensors rounds a block maximum
    whose significand is >= 1.75 up to the next power of two before the MX formula (so 7 < max / X
    <= 8 is not saturated); lowbit uses the specification's floor: equal below 1.75, half above."""
    ct_fake, calculate_qparams, _, presets = _ct()
    w = random_tensor((64, 256), outliers, seed=2)
    args = presets["mxfp4"]["weights"]
    blocks = w.reshape(64, 8, 32)
    ct_scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args)
    q = quantize_weight(w, parse_scheme("Wmxfp4A16").weights)
    ours = q.scale.float().reshape(64, 8)
    amax = blocks.abs().amax(-1)
    significand = amax / torch.exp2(torch.floor(torch.log2(amax)))
    low = significand < 1.75
    assert low.any() and (~low).any()
    assert torch.equal(ours[low], ct_scale.float()[low])
    assert torch.equal(2 * ours[~low], ct_scale.float()[~low])
    assert torch.equal(q.dequantize(), ct_fake(w, ours, torch.zeros_like(ours), args))


@pytest.mark.parametrize("outliers", [False, True])
def test_fp8_per_channel_matches_compressed_tensors(outliers):
    ct_fake, calculate_qparams, _, presets = _ct()
    w = random_tensor((64, 128), outliers, seed=3)
    args = presets["fp8"]["weights"]
    scale, zero = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), args)
    q = quantize_weight(w, parse_scheme("Wfp8A16").weights)
    assert torch.equal(q.scale.float(), scale.float())
    assert torch.equal(q.dequantize(), ct_fake(w, scale, zero, args))


# ---------------------------------------------------------------- activations, STE, storage

FORMAT_WEIGHTS = ["Wfp8", "Wfp8e5m2", "Wfp8g32h", "Wmxfp8", "Wmxfp4", "Wnvfp4", "Wmxfp4m", "Wnvfp4m", "Wfp8m"]


@pytest.mark.parametrize("name", FORMAT_WEIGHTS)
def test_weights_store_bit_exactly(name):
    args = parse_scheme(name + "A16").weights
    w = random_tensor((48, 128), True, seed=4)
    q = quantize_weight(w, args)
    assert torch.equal(q.dequantize(), fake_quantize(w, args))  # what is stored is what was evaluated
    back = QuantizedWeight.from_packed(q.packed(), q.scale, q.zero, q.shape, args, q.global_scale)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.dequantize(), q.dequantize())
    assert q.packed().numel() == w.numel() * args.bits // 8  # two FP4 codes a byte, one FP8 code a byte
    scale_dtype = {"e8m0": torch.float8_e8m0fnu, "float8_e4m3": torch.float8_e4m3fn}.get(args.scale_format)
    if scale_dtype is not None:
        assert q.scale.dtype == scale_dtype


@pytest.mark.parametrize(("name", "bits"), [("Wnvfp4", 4.5), ("Wmxfp4", 4.25), ("Wmxfp8", 8.25), ("Wfp8", 8.0)])
def test_effective_bits(name, bits):
    args = parse_scheme(name + "A16").weights
    assert args.bits_per_value == bits
    q = quantize_weight(torch.randn(64, 256), args)
    extra = 32 if args.global_scale else 0  # NVFP4's float32 tensor scale
    per_channel = 64 * 32 if name == "Wfp8" else 0  # one float32 scale per row
    assert q.nbytes() * 8 == bits * 64 * 256 + extra + per_channel


@pytest.mark.parametrize("name", ["Afp8", "Amxfp8", "Amxfp4", "Anvfp4", "Afp8e5m2"])
def test_dynamic_activations_are_per_token(name):
    """Each token is quantized on its own (NVFP4's global scale too): a batch gives what its tokens give alone."""
    args = parse_scheme(name).inputs
    x = random_tensor((3, 7, 64), True, seed=5)
    whole = fake_quantize(x, args)
    alone = torch.stack([fake_quantize(x[:, t : t + 1], args)[:, 0] for t in range(7)], dim=1)
    assert torch.equal(whole, alone)
    assert (whole - x).abs().max() < x.abs().max()  # and it did quantize
    assert not torch.equal(whole, x)


def test_static_nvfp4_and_fp8_activations_calibrate_a_tensor_scale():
    from lowbit.runtime.quantizer import TensorQuantizer

    x = random_tensor((4, 64), True, seed=6)
    for name in ("Anvfp4s", "Afp8s"):
        quant = TensorQuantizer(parse_scheme(name).inputs)
        quant.observing = True
        quant(x * 2)  # the calibration range is twice the input's
        quant.observing = False
        y = quant(x)
        assert not torch.equal(y, fake_quantize(x, parse_scheme(name.rstrip("s")).inputs))
        assert (y - x).abs().max() < 0.2 * x.abs().max()


@pytest.mark.parametrize("name", ["Wfp8", "Wmxfp4", "Wnvfp4"])
def test_straight_through_gradients_and_learned_scales(name):
    from lowbit.runtime.linear import QuantLinear

    args = parse_scheme(name + "A16").weights
    w = random_tensor((32, 64), False, seed=7).requires_grad_(True)
    fake_quantize(w, args).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # STE
    linear = QuantLinear(quantize_weight(w.detach(), args), None)
    start = linear(torch.ones(1, 64))
    linear.train_on_fixed_grid()
    assert torch.equal(linear(torch.ones(1, 64)), start)  # training starts exactly from the quantized model
    linear.learn_weight_scale()
    assert torch.equal(linear(torch.ones(1, 64)), start)
    with torch.no_grad():  # off the grid, as after a training step (on it, LSQ's gradient is 0)
        linear.weight += 0.05 * torch.randn_like(linear.weight)
    linear.weight.requires_grad_(True)
    linear(torch.randn(5, 64)).pow(2).sum().backward()
    assert linear.weight_scale.grad is not None and linear.weight_scale.grad.abs().sum() > 0
    assert linear.weight.grad is not None
    trained = linear(torch.ones(1, 64)).detach()
    linear.freeze()
    assert linear.is_quantized and torch.equal(linear(torch.ones(1, 64)), trained)


# ---------------------------------------------------------------- GPTQ and AWQ on the format's grid


@pytest.mark.parametrize("name", ["Wfp8", "Wmxfp4", "Wnvfp4", "Wmxfp8"])
def test_gptq_on_the_format_grid_beats_rtn(name):
    from lowbit.algorithms.gptq import gptq_quantize
    from lowbit.algorithms.objective import output_error

    args = parse_scheme(name + "A16").weights
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2048, 128, generator=g) @ torch.randn(128, 128, generator=g) * 0.2  # correlated inputs
    w = random_tensor((64, 128), True, seed=9)
    hessian = 2 * x.T @ x / x.shape[0]
    q = gptq_quantize(w, hessian, args)
    rtn = quantize_weight(w, args)
    # the block scales were fixed before the column updates: GPTQ's scales are RTN's
    assert torch.equal(q.scale, rtn.scale) and (q.global_scale is None or torch.equal(q.global_scale, rtn.global_scale))
    on_grid = quantize_weight(q.dequantize(), args, q.qparams)  # every value on the format's grid: RTN keeps it
    assert torch.equal(on_grid.codes, q.codes)
    assert output_error(w, q.dequantize(), hessian) < 0.8 * output_error(w, rtn.dequantize(), hessian)


# ---------------------------------------------------------------- schemes on models

MODEL_SCHEMES = ["Wfp8Afp8KVfp8", "Wmxfp8Amxfp8KVfp8", "Wmxfp4Amxfp4KVfp8", "Wnvfp4Anvfp4KVnvfp4", "Wnvfp4A16", "Wmxfp4A16", "Wnvfp4Afp8KV8"]


@torch.no_grad()
@pytest.mark.parametrize("scheme", MODEL_SCHEMES)
def test_formats_on_every_family_and_round_trip(family, scheme, tmp_path):
    model = tiny_model(family)
    x = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = model(x).logits
    q = lowbit.quantize(model, scheme, progress=False)
    out = q(x).logits
    assert torch.isfinite(out).all()
    rel = (out - ref).norm() / ref.norm()
    # FP8's 3 mantissa bits: ~4x INT8's error on these Gaussian weights (0.05 for W8A8KV8 here)
    assert 0 < rel < (0.35 if "fp4" not in scheme else 0.9)
    lowbit.save_quantized(q, tmp_path / "m")
    back = lowbit.load_quantized(tmp_path / "m")[0]
    assert torch.equal(back(x).logits, out)
    assert lowbit.quantization_state(back).scheme == parse_scheme(scheme)


@torch.no_grad()
def test_block_hadamard_with_gptq_on_nvfp4():
    from conftest import tiny_model as make

    model = make("llama")
    calib = [torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    x = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = model(x).logits
    config = lowbit.TransformConfig("rotate", rotation_block=16, fuse_r1=False, fold_norms=False)
    q = lowbit.quantize(model, "Wnvfp4Anvfp4KVnvfp4", transform=config, algorithm="gptq", calibration=calib, progress=False)
    assert (q(x).logits - ref).norm() / ref.norm() < 0.9  # RTN without the rotation: ~0.6 on this random model
    blocks = [m for m in q.modules() if isinstance(m, lowbit.runtime.rotation.OnlineHadamard)]
    assert blocks and all(m.block == 16 for m in blocks)


CALIB = [torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(s)) for s in range(4)]


@torch.no_grad()
@pytest.mark.parametrize("scheme", ["Wfp8Afp8KVfp8", "Wnvfp4Anvfp4KVnvfp4", "Wmxfp4Amxfp4KVfp8", "Wnvfp4A16"])
@pytest.mark.parametrize(
    "transform",
    [
        lowbit.TransformConfig("smooth", alpha=None),
        lowbit.TransformConfig("rotate"),
        lowbit.TransformConfig("smoothrot", smooth_all=True, alpha=None, rotation_block=16),
    ],
    ids=lambda c: f"{c.kind}-block{c.rotation_block}",
)
def test_transforms_compose_with_every_format(scheme, transform):
    model = tiny_model("qwen2")
    x = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    ref = model(x).logits
    q = lowbit.quantize(model, scheme, transform=transform, calibration=CALIB, progress=False)
    # the same transform without quantization is the same function: the difference is the format's
    plain = lowbit.quantize(model, "W16A16KV16", transform=transform, calibration=CALIB, progress=False)
    assert (plain(x).logits - ref).abs().max() < 1e-3
    assert 0 < (q(x).logits - ref).norm() / ref.norm() < (0.35 if "fp4" not in scheme else 0.9)


@torch.no_grad()
@pytest.mark.parametrize("scheme", ["Wnvfp4A16", "Wmxfp4A16", "Wfp8A16"])
def test_awq_on_formats_lowers_the_output_error(scheme):
    q = lowbit.quantize(tiny_model("llama"), scheme, algorithm="awq", calibration=CALIB, progress=False)
    groups = [g for layer in lowbit.quantization_state(q).layer_errors for key, g in layer.items() if key != "layer"]
    assert len(groups) == 8
    # the search runs on a sample of the calibration rows: within 1% of RTN per group, lower in all
    assert all(g["awq"] <= g["rtn"] * 1.01 for g in groups)
    assert sum(g["awq"] for g in groups) < 0.99 * sum(g["rtn"] for g in groups)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("Wmxfp4g32A16", "takes no group size"),
        ("Wnvfp4aA16", "symmetric"),
        ("Wfp8aA16", "symmetric"),
        ("W4Amxfp4s", "nothing to calibrate"),
        ("Wnvfp4hA16", "fixes its scale format"),
        ("Wmxfp4tA16", "scales blocks"),
        ("Wfp6A16", "cannot parse"),
        ("Wfp8fA16", "integer grid"),
    ],
)
def test_bad_format_names_are_refused_with_the_reason(name, message):
    with pytest.raises(UserError, match=message):
        parse_scheme(name)


def test_format_names_round_trip():
    for name in ["Wfp8Afp8KVfp8", "Wmxfp8Amxfp8KVmxfp8", "Wnvfp4Anvfp4sKVnvfp4", "Wnvfp4mA16KV16", "Wfp8g128hAfp8sKVfp8t", "Wnvfp4Afp8KV8"]:
        scheme = parse_scheme(name)
        assert parse_scheme(scheme.name) == scheme
    scheme = parse_scheme("Wnvfp4Anvfp4KVnvfp4")
    assert scheme.weights.global_scale == "tensor" and scheme.inputs.global_scale == "token" and scheme.keys.global_scale == "token"
    assert parse_scheme("Anvfp4s").inputs.global_scale == "tensor"
    assert scheme.formats()["weights"] == {"format": "nvfp4", "bits_per_value": 4.5}


def test_blocks_that_do_not_divide_a_layer_are_refused_early(family):
    from lowbit.api import check_scheme_for_config

    model = tiny_model(family)  # hidden 64, intermediate 128, head_dim 16
    with pytest.raises(UserError, match="32-value blocks of mxfp4 does not divide head_dim=16"):
        lowbit.quantize(model, "W16A16KVmxfp4", progress=False)
    config = model.config
    config.intermediate_size = 120
    with pytest.raises(UserError, match="16-value blocks of nvfp4 does not divide in_features=120"):
        check_scheme_for_config(config, parse_scheme("Wnvfp4A16"))
    with pytest.raises(UserError, match="rotation_block"):
        lowbit.TransformConfig("smooth", rotation_block=16)
    with pytest.raises(UserError, match="block Hadamard of size 48 does not divide"):
        lowbit.quantize(tiny_model(family), "Wnvfp4A16", transform=lowbit.TransformConfig("rotate", rotation_block=48), progress=False)


def test_integer_kernels_refuse_float_formats():
    from lowbit.runtime.int_linear import check_integer_formats

    with pytest.raises(UserError, match="integer formats only"):
        check_integer_formats(parse_scheme("Wnvfp4A16"))
    q = lowbit.quantize(tiny_model("llama"), "Wfp8Afp8", progress=False)
    with pytest.raises(UserError, match="integer formats only"):
        lowbit.convert_to_int_kernels(q)
