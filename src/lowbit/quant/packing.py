"""Packing of N-bit integer codes (N = 1..8) into bytes, and back, exactly.

Codes are laid out as one little-endian bit stream: value i occupies bits [i*N, (i+1)*N).
So 8 3-bit values fill 3 bytes and 2 4-bit values fill one byte.
"""

from __future__ import annotations

import torch

_BYTE_WEIGHTS = 2 ** torch.arange(8, dtype=torch.int32)


def unsigned_codes(codes: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Map signed symmetric codes [-2^(N-1), 2^(N-1)-1] to [0, 2^N-1] (asymmetric codes already are)."""
    offset = 2 ** (bits - 1) if symmetric else 0
    wide = codes if codes.dtype in (torch.int16, torch.int32, torch.int64) else codes.to(torch.int16)
    return (wide + offset).to(torch.uint8)  # one pass, no int32 copy: these run once per weight


def signed_codes(codes: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    offset = 2 ** (bits - 1) if symmetric else 0
    return codes.to(torch.int16) - offset


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (< 2^bits) into a flat uint8 tensor of ceil(numel * bits / 8) bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    flat = codes.reshape(-1)
    if flat.dtype != torch.uint8:  # uint8 codes (the usual case) need neither the copy nor a sign check
        flat = flat.to(torch.int32)
        if flat.numel() and flat.min() < 0:
            raise ValueError(f"codes out of range for {bits}-bit packing")
    if flat.numel() and (flat.dtype != torch.uint8 or bits < 8) and int(flat.max()) >= 2**bits:
        raise ValueError(f"codes out of range for {bits}-bit packing")
    if bits == 8:  # fast paths, the same layout as the bit stream
        return flat.to(torch.uint8)
    if bits == 4:
        small = flat.to(torch.uint8)
        if small.numel() % 2:
            small = torch.cat([small, small.new_zeros(1)])
        pairs = small.view(-1, 2)
        return pairs[:, 0] | (pairs[:, 1] << 4)
    return pack_bitstream(flat.to(torch.int32), bits)


def pack_bitstream(flat: torch.Tensor, bits: int) -> torch.Tensor:
    """The general packing: every code's bits, least significant first, into one stream of bytes."""
    shifts = torch.arange(bits, dtype=torch.int32)
    bitstream = ((flat[:, None] >> shifts) & 1).reshape(-1)
    pad = (-bitstream.numel()) % 8
    if pad:
        bitstream = torch.cat([bitstream, bitstream.new_zeros(pad)])
    return (bitstream.reshape(-1, 8) * _BYTE_WEIGHTS).sum(dim=1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack`: the first `count` codes as uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    if packed.numel() != packed_nbytes(count, bits):
        raise ValueError(f"expected {packed_nbytes(count, bits)} bytes for {count} {bits}-bit codes, got {packed.numel()}")
    if bits == 8:
        return packed.reshape(-1).to(torch.uint8).clone()
    if bits == 4:
        b = packed.reshape(-1).to(torch.int32)
        return torch.stack([b & 15, b >> 4], dim=1).reshape(-1)[:count].to(torch.uint8)
    bitstream = ((packed.reshape(-1).to(torch.int32)[:, None] >> torch.arange(8, dtype=torch.int32)) & 1).reshape(-1)
    bitstream = bitstream[: count * bits].reshape(count, bits)
    return (bitstream * (2 ** torch.arange(bits, dtype=torch.int32))).sum(dim=1).to(torch.uint8)
