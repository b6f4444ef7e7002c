"""Writing a safetensors file and its sha256 in one pass.

The file layout is the safetensors format's: an 8-byte little-endian header length, a JSON header
({name: {dtype, shape, data_offsets}, "__metadata__": {...}}, padded with spaces to a multiple of
8 bytes), then every tensor's bytes in the header's order. Hashing the bytes as they are written
(in a second thread: both the write and the hash release the GIL) saves reading the whole file
back to checksum it, which took about as long as writing it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
CHUNK = 16 << 20  # bytes handed to the writer and the hasher at a time


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.dtype is torch.bool:
        flat = flat.to(torch.uint8)
    return memoryview(flat.view(torch.uint8).numpy())


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> tuple[str, int]:
    """Write `tensors` to `path` as a safetensors file; returns (sha256 hex digest, bytes written)."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in DTYPES:
            raise ValueError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    prefix = struct.pack("<Q", len(text)) + text
    digest = hashlib.sha256()
    with open(path, "wb") as f, ThreadPoolExecutor(max_workers=1) as hasher:
        pending = []  # the hasher takes the chunks in order, while this thread writes them
        for chunk in [memoryview(prefix)] + [_bytes_of(t) for t in tensors.values()]:
            for start in range(0, len(chunk), CHUNK):
                piece = chunk[start : start + CHUNK]
                pending.append(hasher.submit(digest.update, piece))
                f.write(piece)
        for done in pending:
            done.result()
    return digest.hexdigest(), len(prefix) + offset
