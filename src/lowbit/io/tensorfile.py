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
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e8m0fnu: "F8_E8M0",
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


class SafetensorsSpill:
    """A safetensors file written tensor by tensor as they are produced: each tensor's bytes go to a
    data file in `folder` at once (nothing is kept in memory), and `finish` writes the header and
    copies the data behind it, hashing as it goes, as `write_safetensors` would have written it."""

    def __init__(self, folder: str | Path) -> None:
        self._data_path = Path(folder) / ".tensors.data"
        self._data = open(self._data_path, "wb")
        self._header: dict = {}
        self._offset = 0

    def __contains__(self, name: str) -> bool:
        return name in self._header

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._header:
            raise ValueError(f"{name} is written already")
        if tensor.dtype not in DTYPES:
            raise ValueError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors")
        size = tensor.numel() * tensor.element_size()
        self._header[name] = {"dtype": DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [self._offset, self._offset + size]}
        self._data.write(_bytes_of(tensor))
        self._offset += size

    def finish(self, path: str | Path, metadata: dict[str, str] | None = None) -> tuple[str, int]:
        """Write the file to `path`; returns (sha256 hex digest, bytes written). The data file is removed."""
        self._data.close()
        header = {"__metadata__": dict(metadata)} if metadata else {}
        header.update(self._header)
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        prefix = struct.pack("<Q", len(text)) + text
        digest = hashlib.sha256(prefix)
        with open(path, "wb") as f, open(self._data_path, "rb") as data:
            f.write(prefix)
            for block in iter(lambda: data.read(CHUNK), b""):
                digest.update(block)
                f.write(block)
        self._data_path.unlink()
        return digest.hexdigest(), len(prefix) + self._offset


TREE_KEY = "lowbit_tree"  # metadata entry holding the JSON skeleton of a saved tree


def save_tree(path: str | Path, tree) -> None:
    """Save nested dicts / lists of tensors, numbers, strings, booleans and None (a training
    checkpoint: weights, optimizer state, history, settings) as one safetensors file: every tensor
    a tensor entry, the structure JSON in the metadata. Nothing is pickled, so loading runs no code."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(node):
        if isinstance(node, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = node.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(node, dict):
            return {"__items__": [[encode(k), encode(v)] for k, v in node.items()]}  # keys of any JSON type
        if isinstance(node, (list, tuple)):
            return [encode(v) for v in node]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot store a {type(node).__name__} in a checkpoint")

    skeleton = json.dumps(encode(tree))
    write_safetensors(path, tensors, {TREE_KEY: skeleton})


def load_tree(path: str | Path):
    """Inverse of `save_tree`; a file that is not one raises ValueError."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a safetensors file ({exc})") from None
    if TREE_KEY not in metadata:
        raise ValueError(f"{path} holds no {TREE_KEY} metadata")
    skeleton = json.loads(metadata[TREE_KEY])

    def decode(node):
        if isinstance(node, dict):
            if "__tensor__" in node:
                return tensors[node["__tensor__"]]
            return {decode(k): decode(v) for k, v in node["__items__"]}
        if isinstance(node, list):
            return [decode(v) for v in node]
        return node

    return decode(skeleton)
