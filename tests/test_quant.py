import pytest
import torch

from lowbit import QuantArgs
from lowbit.quant import dequantize, fake_quantize, pack, packed_nbytes, quantize, signed_codes, unpack, unsigned_codes
from lowbit.quant.fake import MSE_NORM, as_rows, minmax_qparams, mse_qparams


def test_symmetric_per_tensor_by_hand():
    x = torch.tensor([[-1.0, 0.2, 0.5], [0.7, -0.35, 0.0]])
    args = QuantArgs(bits=3, granularity="tensor")  # a = 1/3, codes -4..3
    expected = torch.tensor([[-3, 1, 2], [2, -1, 0]]) / 3  # 0.5/(1/3)=1.5 rounds to 2 (half to even)
    assert torch.allclose(fake_quantize(x, args), expected)


def test_symmetric_per_channel_by_hand():
    w = torch.tensor([[0.1, -0.7, 0.33], [2.0, 1.2, -0.5]])
    args = QuantArgs(bits=4, granularity="channel")  # a = max|row| / 7
    a0, a1 = 0.7 / 7, 2.0 / 7
    # codes: 0.33/a0 = 3.3 -> 3; 1.2/a1 = 4.2 -> 4; -0.5/a1 = -1.75 -> -2
    expected = torch.tensor([[1 * a0, -7 * a0, 3 * a0], [7 * a1, 4 * a1, -2 * a1]])
    assert torch.allclose(fake_quantize(w, args), expected)


def test_asymmetric_per_token_by_hand():
    x = torch.tensor([[[0.0, 1.0, 3.0], [-2.0, -1.0, 2.0]]])  # [batch, tokens, channels]
    args = QuantArgs(bits=2, symmetric=False, granularity="token")  # b = min, a = (max-min)/3
    # token 0: a = 1, b = 0 -> exact; token 1: a = 4/3, b = -2 -> codes 0, round(0.75)=1, 3
    expected = torch.tensor([[[0.0, 1.0, 3.0], [-2.0, -2.0 + 4 / 3, 2.0]]])
    assert torch.allclose(fake_quantize(x, args), expected)


def test_full_range_symmetric_by_hand():
    w = torch.tensor([[0.75, -0.7, 0.1, 0.05]])
    args = QuantArgs(bits=3, granularity="channel", full_range=True)  # a = 0.75 / 3.5, codes -4..3
    a = 0.75 / 3.5
    # 0.75/a = 3.5 -> 4, clamped to 3 (the half step clipped at +max); -0.7/a = -3.27 -> -3; 0.1/a = 0.47 -> 0;
    # the restricted grid (a = 0.75/3) would use only -3..3
    expected = torch.tensor([[3 * a, -3 * a, 0.0, 0.0]])
    assert torch.allclose(fake_quantize(w, args), expected)
    codes, _ = quantize(torch.tensor([[-0.75, 0.7, 0.2]]), args)
    assert codes.tolist() == [[-4, 3, 1]]  # -3.5 rounds (half to even) to -4: the code LLM-QAT's grid leaves unused


def test_per_group_by_hand():
    x = torch.tensor([[1.0, -0.5, 10.0, 2.5]])
    args = QuantArgs(bits=2, granularity="group", group_size=2)  # qmax = 1: a = max|group|
    expected = torch.tensor([[1.0, -0.0, 10.0, 0.0]])  # -0.5/1 -> round(-0.5)= -0; 2.5/10 -> 0
    assert torch.equal(fake_quantize(x, args), expected)


def test_clip_ratio_shrinks_the_range():
    x = torch.tensor([[-1.0, 0.5, 0.1]])
    args = QuantArgs(bits=2, granularity="token", clip_ratio=0.5)  # a = 0.5, codes -2..1
    assert torch.allclose(fake_quantize(x, args), torch.tensor([[-1.0, 0.5, 0.0]]))


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        fake_quantize(torch.randn(4, 10), QuantArgs(bits=4, granularity="group", group_size=4))


def test_zero_rows_stay_zero():
    x = torch.zeros(3, 8)
    assert torch.equal(fake_quantize(x, QuantArgs(bits=4)), x)
    assert torch.equal(fake_quantize(x, QuantArgs(bits=4, symmetric=False)), x)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric, full_range", [(True, False), (False, False), (True, True)])
def test_error_bound_half_step(bits, symmetric, full_range):
    torch.manual_seed(0)
    x = torch.randn(16, 64)
    args = QuantArgs(bits=bits, symmetric=symmetric, granularity="channel", full_range=full_range)
    rows = as_rows(x, args)
    qp = minmax_qparams(rows, args)
    err = (fake_quantize(x, args) - x).abs()
    assert torch.all(err <= qp.scale / 2 + 1e-6)
    assert len(torch.unique(fake_quantize(x, args)[0])) <= 2**bits


def test_mse_search_never_worse_than_minmax():
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    w[:, 0] *= 20  # outliers make clipping worth it
    for bits in (2, 3, 4):
        plain = QuantArgs(bits=bits)
        searched = QuantArgs(bits=bits, observer="mse")
        e_plain = (fake_quantize(w, plain) - w).abs().pow(MSE_NORM).sum(1)  # the search's own objective
        e_mse = (fake_quantize(w, searched) - w).abs().pow(MSE_NORM).sum(1)
        assert torch.all(e_mse <= e_plain + 1e-6)
        assert e_mse.sum() < e_plain.sum()


def test_mse_search_finds_a_clipped_range():
    rows = torch.cat([torch.linspace(-1, 1, 127), torch.tensor([40.0])]).unsqueeze(0)
    qp = mse_qparams(rows, QuantArgs(bits=3))
    assert qp.scale.item() < 40.0 / 3


def test_ste_gradient_is_identity():
    x = torch.randn(4, 16, requires_grad=True)
    y = fake_quantize(x, QuantArgs(bits=4, granularity="token"))
    weights = torch.randn(4, 16)
    (y * weights).sum().backward()
    assert torch.equal(x.grad, weights)
    assert not torch.equal(y.detach(), x.detach())  # the forward pass did quantize


def test_quantize_dequantize_matches_fake_quantize():
    torch.manual_seed(1)
    w = torch.randn(8, 32)
    for args in (QuantArgs(bits=4), QuantArgs(bits=3, symmetric=False, granularity="group", group_size=8)):
        codes, qp = quantize(w, args)
        assert codes.min() >= args.qmin and codes.max() <= args.qmax
        assert torch.allclose(dequantize(codes, qp, w.shape, args), fake_quantize(w, args))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("count", [1, 7, 8, 64, 1001])
def test_pack_round_trip(bits, count):
    g = torch.Generator().manual_seed(bits * 1000 + count)
    codes = torch.randint(0, 2**bits, (count,), generator=g).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(count, bits) == (count * bits + 7) // 8
    assert torch.equal(unpack(packed, bits, count), codes)


def test_pack_layout_is_little_endian_bitstream():
    assert pack(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    assert pack(torch.tensor([1, 0, 3, 7, 0, 0, 0, 5], dtype=torch.uint8), 3).tolist() == [0b11000001, 0b00001110, 0b10100000]


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack(torch.tensor([4], dtype=torch.uint8), 2)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_signed_codes_pack_round_trip(bits):
    torch.manual_seed(bits)
    w = torch.randn(6, 40)
    args = QuantArgs(bits=bits)
    codes, qp = quantize(w, args)
    packed = pack(unsigned_codes(codes, bits, True), bits)
    back = signed_codes(unpack(packed, bits, codes.numel()), bits, True).reshape(codes.shape)
    assert torch.equal(back, codes)
    assert torch.allclose(dequantize(back, qp, w.shape, args), fake_quantize(w, args))
