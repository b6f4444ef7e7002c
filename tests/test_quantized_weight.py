"""`QuantizedWeight`: what every algorithm produces is codes and scales whose dequantization is
exactly the fake-quantized weight; `QuantLinear` holds it at its bit width and computes with it;
scale formats round the scales the quantizer uses; and the release of memory-mapped pages."""

import numpy as np
import pytest
import torch
from conftest import tiny_model

import lowbit
from lowbit.algorithms.awq import AWQ, AWQConfig
from lowbit.algorithms.gptq import GPTQConfig, gptq_quantize
from lowbit.algorithms.rtn import rtn_weight
from lowbit.evaluation import model_size_bytes
from lowbit.memory import release_mapped_pages
from lowbit.pipeline import PipelineConfig
from lowbit.quant import QuantizedWeight, fake_quantize, packed_nbytes
from lowbit.quant.fake import as_rows, compute_qparams
from lowbit.runtime import QuantLinear
from lowbit.scheme import parse_scheme

NAMES = ["W4", "W4f", "W8f", "W4a", "W4g16", "W4g16a", "W3g32a", "W8", "W8a", "W2", "W4c80", "W4ac80", "W4m", "W4am", "W8t", "W4h", "W4g16ab", "W8bt"]


def calib(n=4, length=32):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 512, (1, length), generator=g) for _ in range(n)]


def weight_and_inputs(seed=0):
    torch.manual_seed(seed)
    return torch.randn(48, 128) * 0.05, torch.randn(512, 128) * torch.rand(128) * 3


@pytest.mark.parametrize("name", NAMES)
def test_rtn_codes_dequantize_to_the_fake_quantized_weight(name):
    args = parse_scheme(name).weights
    w, _ = weight_and_inputs()
    q = rtn_weight(w, args)
    assert torch.equal(q.dequantize(), fake_quantize(w, args))  # bit for bit: the same arithmetic
    assert q.codes.min() >= args.qmin and q.codes.max() <= args.qmax
    assert q.scale.dtype == {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.scale_format]
    assert (q.zero is None) == args.symmetric


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_keeps_the_scales_it_quantized_with(name, act_order):
    """GPTQ's codes times its own scales: every value on the grid of its row (or group), and the
    output error no worse than RTN's (GPTQ's whole point), on the same Hessian."""
    args = parse_scheme(name).weights
    w, x = weight_and_inputs(1)
    h = x.T @ x
    q = gptq_quantize(w, h, args, GPTQConfig(act_order=act_order))
    assert q.codes.min() >= args.qmin and q.codes.max() <= args.qmax
    deq = q.dequantize()
    qp = q.qparams
    assert torch.equal(as_rows(deq, args), q.codes.float() * qp.scale + qp.zero)
    err = lambda v: torch.einsum("oi,ij,oj->", w - v, h, w - v).item()  # noqa: E731
    assert err(deq) <= err(rtn_weight(w, args).dequantize()) * 1.0001


@pytest.mark.parametrize("name", ["W4", "W4g16", "W3g32a", "W4h"])
def test_awq_returns_codes_for_the_scaled_weight(name):
    args = parse_scheme(name).weights
    w, x = weight_and_inputs(2)
    awq = AWQ(128)
    awq.add_batch(x)
    q, scales = awq.quantize(w, args, AWQConfig())
    assert scales is not None and q.shape == tuple(w.shape)
    # codes on the per-row grid of the scaled weight: requantizing with the kept scales changes nothing
    assert torch.equal(lowbit.quant.quantize_weight(q.dequantize(), args, q.qparams).codes, q.codes)


@pytest.mark.parametrize("name", NAMES)
def test_packing_round_trip_and_bytes(name):
    args = parse_scheme(name).weights
    q = rtn_weight(weight_and_inputs()[0], args)
    packed = q.packed()
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(q.codes.numel(), args.bits)
    back = QuantizedWeight.from_packed(packed, q.scale, q.zero, q.shape, args)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.dequantize(), q.dequantize())
    scale_bytes = q.scale.element_size() * q.scale.numel() * (1 if args.symmetric else 2)
    assert q.nbytes() == packed.numel() + scale_bytes


def test_split_and_rescale_rows_keep_the_codes():
    for name in ("W4", "W4g16a", "W4t"):
        args = parse_scheme(name).weights
        q = rtn_weight(weight_and_inputs()[0], args)
        parts = q.split_rows([16, 8, 24])
        assert torch.equal(torch.cat([p.dequantize() for p in parts]), q.dequantize())
        if args.granularity.value == "tensor":
            with pytest.raises(ValueError):
                q.scale_output_rows(torch.ones(48))
            continue
        factor = torch.rand(48) + 0.5
        scaled = q.scale_output_rows(factor)
        assert torch.equal(scaled.codes, q.codes)
        torch.testing.assert_close(scaled.dequantize(), q.dequantize() * factor[:, None], rtol=1e-6, atol=1e-7)


def test_fp16_scale_format_rounds_the_scales_the_quantizer_uses():
    """W4h: the quantizer itself uses fp16-rounded scales, so what is evaluated is what an fp16-scale
    checkpoint computes; tiny rows keep a positive scale (clamped to fp16's smallest normal)."""
    w = weight_and_inputs()[0]
    w[0] = 1e-9  # a row far below fp16's range
    half, full = parse_scheme("W4h").weights, parse_scheme("W4").weights
    qp = compute_qparams(as_rows(w, half), half)
    assert torch.equal(qp.scale, qp.scale.half().float()) and bool((qp.scale > 0).all())
    assert not torch.equal(qp.scale, compute_qparams(as_rows(w, full), full).scale)
    q = rtn_weight(w, half)
    assert q.scale.dtype == torch.float16 and torch.equal(q.dequantize(), fake_quantize(w, half))
    assert rtn_weight(w, full).nbytes() - q.nbytes() == 2 * 48  # two bytes saved per row scale


@pytest.mark.parametrize("name", ["W4A16", "W4g16A16", "W4aA16", "W3g32A16", "W8A8", "W2A16", "W4fA16", "W4hA16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_quant_linear_holds_codes_and_computes_with_them(name, dtype):
    s = parse_scheme(name)
    w = weight_and_inputs()[0]
    q = rtn_weight(w, s.weights)
    lin = QuantLinear(q, torch.randn(48), None, s.inputs).to(dtype)
    assert lin.weight is None and lin.is_quantized
    assert lin.weight_codes.numel() == packed_nbytes(w.numel(), s.weights.bits)  # held at its bit width
    assert lin.weight_scale.dtype == q.scale.dtype  # model.to(dtype) does not round the stored scales
    x = torch.randn(3, 5, 128).to(dtype)
    if lin.input_quant is None:
        ref = torch.nn.functional.linear(x, q.dequantize(dtype), lin.bias)
    else:  # codes times codes, as int8 / FP8 GEMMs compute them: in float32, the output rounded to dtype
        ref = torch.nn.functional.linear(lin.input_quant(x.float()), q.dequantize(), lin.bias.float()).to(dtype)
    assert torch.equal(lin(x), ref)
    assert torch.equal(lin.quantized_weight.codes, q.codes)


@pytest.mark.parametrize("algorithm", ["rtn", "gptq", "awq"])
@torch.no_grad()
def test_quantized_models_hold_codes_only(family, algorithm, tmp_path):
    """After quantization no decoder linear keeps a float weight; sizes count codes and scales;
    save and reload give identical logits."""
    x = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))
    kwargs = dict(algorithm=algorithm, progress=False)
    if algorithm != "rtn":
        kwargs.update(calibration=calib(), pipeline=PipelineConfig(batch_size=2))
    model = tiny_model(family)
    q = lowbit.quantize(model, "W4g16A8KV4", **kwargs)
    linears = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert linears and all(m.is_quantized and m.weight is None for m in linears)
    float_bytes = sum(m.in_features * m.out_features * 4 for m in linears)
    assert sum(m.weight_codes.numel() for m in linears) <= float_bytes / 8
    assert model_size_bytes(q) < model_size_bytes(model)
    lowbit.save_quantized(q, tmp_path / "saved")
    reloaded = lowbit.load_quantized(tmp_path / "saved")[0]
    assert torch.equal(reloaded(x).logits, q(x).logits)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc")
def test_release_mapped_pages_gives_back_a_private_file_mapping(tmp_path):
    """Pages of a copy-on-write file mapping (how safetensors checkpoints load) stay resident after
    reads and edits; released, they leave the resident set and the file is untouched."""
    path = tmp_path / "weights.bin"
    values = np.arange(16 * 2**20, dtype=np.float32)  # 64 MiB
    values.tofile(path)
    mapped = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c"))  # MAP_PRIVATE
    mapped.mul_(2)  # in-place edit: copy-on-write pages, now resident
    before = _rss()
    released = release_mapped_pages(mapped)
    assert released >= mapped.numel() * 4 - 2 * 4096
    assert before - _rss() >= 0.9 * released
    assert np.array_equal(np.fromfile(path, dtype=np.float32)[:1000], values[:1000])  # the file never changed
    heap = torch.ones(2**20)
    assert release_mapped_pages(heap) == 0 and bool((heap == 1).all())  # anonymous memory is left alone


@torch.no_grad()
def test_dense_weight_cache_gives_the_same_outputs_and_is_dropped():
    from lowbit.runtime.linear import dense_weights_cached

    model = tiny_model("llama")
    q = lowbit.quantize(model, "W4g16A8KV4", progress=False)
    x = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = q(x).logits
    linears = [m for m in q.modules() if isinstance(m, QuantLinear)]
    with dense_weights_cached(q):
        assert torch.equal(q(x).logits, ref)
        assert all(m._dense_cache is not None for m in linears)  # dequantized once, reused
        assert torch.equal(q(x).logits, ref)
    assert all(m._dense_cache is None and not m.cache_dense for m in linears)  # codes only again
