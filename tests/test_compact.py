"""Quantized weights held packed at their bit width (`QuantLinear.compact`): same forward, exact
round trip, fewer resident bytes; and the release of memory-mapped pages behind it."""

import numpy as np
import pytest
import torch
from conftest import tiny_model

import lowbit
from lowbit.algorithms.rtn import rtn_weight
from lowbit.evaluation import model_size_bytes
from lowbit.io import load_quantized, save_quantized
from lowbit.memory import release_mapped_pages
from lowbit.pipeline import PipelineConfig
from lowbit.runtime import QuantLinear, compact_weights, expand_weights
from lowbit.scheme import parse_scheme


def calib(n=4, length=32):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 512, (1, length), generator=g) for _ in range(n)]


def quant_linear(scheme: str, dtype=torch.float32, rows=48, cols=64) -> QuantLinear:
    """A QuantLinear holding an RTN-quantized weight. In bf16 the grid values must survive the
    cast: every row (group) reaches the top code and the scales are powers of two."""
    s = parse_scheme(scheme)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(rows, cols, generator=g)
    if dtype != torch.float32:
        qmax = s.weights.qmax
        w = torch.randint(-qmax, qmax + 1, (rows, cols), generator=g).float()
        w[:, ::16] = qmax
        w *= 2.0 ** -torch.randint(2, 6, (rows, 1), generator=g).float()
    if s.weights is not None:
        w = rtn_weight(w, s.weights)
    return QuantLinear(w.to(dtype), torch.randn(rows).to(dtype), s.weights, s.inputs)


SCHEMES = ["W4A16", "W4g16A16", "W4aA16", "W3g32A16", "W8A8", "W2A16", "W4fA16"]


@pytest.mark.parametrize(
    "scheme, dtype",
    [(s, torch.float32) for s in SCHEMES] + [(s, torch.bfloat16) for s in ("W4A16", "W4g16A16", "W8A8")],
)
@torch.no_grad()
def test_compacted_linear_has_the_same_forward_and_expands_bit_for_bit(scheme, dtype):
    lin = quant_linear(scheme, dtype)
    x = torch.randn(3, 5, 64).to(dtype)
    weight, out = lin.weight.detach().clone(), lin(x)
    assert lin.compact() and lin.compacted and lin.weight is None
    assert torch.equal(lin(x), out)
    bits = parse_scheme(scheme).weights.bits
    assert lin.codes.packed.numel() == (weight.numel() * bits + 7) // 8  # held at its bit width
    lin.expand()
    assert not lin.compacted and lin.weight.dtype == dtype and torch.equal(lin.weight, weight)


@torch.no_grad()
def test_what_cannot_be_compacted_is_left_as_it_is():
    plain = quant_linear("W16A8")  # activations only: no weight codes
    assert plain.weight_args is None and not plain.compact() and plain.weight is not None
    off_grid = quant_linear("W4A16")
    off_grid.weight.add_(1e-3 * torch.randn_like(off_grid.weight))
    before = off_grid.weight.clone()
    assert not off_grid.compact() and torch.equal(off_grid.weight, before)
    latent = quant_linear("W4A16")
    latent.trainable = True  # QAT's latent weight is full precision, not codes
    assert not latent.compact()


@pytest.mark.parametrize("algorithm", ["rtn", "gptq", "awq"])
@torch.no_grad()
def test_compact_quantized_model_equals_the_expanded_one(family, algorithm, tmp_path):
    """`quantize_model(compact=True)`: same logits, a fraction of the weight bytes, same size in the
    cost table; it saves exactly like the expanded model and expands back bit for bit."""
    x = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))
    kwargs = dict(algorithm=algorithm, progress=False)
    if algorithm != "rtn":
        kwargs.update(calibration=calib(), pipeline=PipelineConfig(batch_size=2))
    full = lowbit.quantize_model(tiny_model(family), "W4g16A8KV4", **kwargs)
    packed = lowbit.quantize_model(tiny_model(family), "W4g16A8KV4", compact=True, **kwargs)
    linears = [m for m in packed.modules() if isinstance(m, QuantLinear)]
    assert linears and all(m.compacted for m in linears)
    assert torch.equal(packed(x).logits, full(x).logits)
    assert model_size_bytes(packed) == model_size_bytes(full)
    float_bytes = sum(m.weight.numel() * 4 for m in full.modules() if isinstance(m, QuantLinear))
    assert sum(m.codes.packed.numel() for m in linears) <= float_bytes / 8
    save_quantized(packed, tmp_path / "packed")
    reloaded = load_quantized(tmp_path / "packed")[0]
    assert torch.equal(reloaded(x).logits, full(x).logits)
    expand_weights(packed)
    for a, b in zip(linears, (m for m in full.modules() if isinstance(m, QuantLinear))):
        assert torch.equal(a.weight, b.weight)
    assert compact_weights(packed) == len(linears)


@torch.no_grad()
def test_quantize_model_without_compact_returns_float_weights():
    """The pipeline packs each finished layer for memory; the API returns float weights by default."""
    model = lowbit.quantize_model(tiny_model("llama"), "W4A16", algorithm="gptq", calibration=calib(), progress=False)
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert linears and not any(m.compacted for m in linears)
    assert all(isinstance(m.weight, torch.nn.Parameter) for m in linears)


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
