"""Sequential onloading: a model whose weights stay on disk until the layer that needs them runs.

The model is built from its config with every parameter on the meta device (buffers that no
checkpoint holds, such as RoPE's inverse frequencies, are computed as usual). `Checkpoint` reads
tensors by name from the folder's safetensors files (one file or shards with an index), converted
to float32 as `from_pretrained(dtype=torch.float32)` would; `onload` fills one module's meta
parameters from it and `offload` turns them back into meta tensors, so only the layers being
worked on are resident. Names are the model's own state-dict names, which is what transformers
writes for the dense families lowbit supports.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from pathlib import Path

import torch
from torch import nn

from .arch import MoESpec
from .errors import UserError

log = logging.getLogger("lowbit")

INDEX_FILE = "model.safetensors.index.json"
READ_CHUNK = 16 << 20  # bytes read (and converted) at a time


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class Checkpoint:
    """The safetensors tensors of a transformers model folder, read one at a time.

    Tensors are read with plain file reads from the offsets in each file's header, not through a
    memory map: mapped pages a process has touched count as its resident memory until the map is
    closed, so reading a whole checkpoint through one would make it resident, layer after layer."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
                raise UserError(f"{index} is not a safetensors index ({exc}); save the model again") from None
            missing = sorted({f for f in weight_map.values() if not (self.folder / f).is_file()})
            if missing:
                raise UserError(
                    f"{self.folder} is incomplete: shard {missing[0]} listed in {INDEX_FILE} is missing ({len(missing)} in all); copy the folder"
                )
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                raise UserError(f"{self.folder} has no .safetensors weights; lowbit never loads pickled weights (pytorch_model.bin)")
        self._entries: dict[str, tuple[Path, str, list[int], int, int]] = {}  # name -> file, dtype, shape, start, end
        for name in files:
            self._read_header(self.folder / name)

    def _read_header(self, path: Path) -> None:
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                length = struct.unpack("<Q", f.read(8))[0]
                if length > size - 8:
                    raise ValueError("header longer than the file")
                header = json.loads(f.read(length))
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"{path} is not a readable safetensors file ({exc}); the shard is truncated or corrupted") from None
        base = 8 + length
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            start, end = meta["data_offsets"]
            if meta["dtype"] not in _DTYPES or base + end > size:
                raise UserError(
                    f"{path}: tensor {key} is {'truncated' if base + end > size else 'of unknown dtype ' + meta['dtype']}; the shard is damaged"
                )
            self._entries[key] = (path, meta["dtype"], meta["shape"], base + start, base + end)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def float32_bytes(self) -> int:
        """Bytes the floating-point tensors take in float32."""
        return sum(4 * math.prod(shape) for _, dtype, shape, _, _ in self._entries.values() if dtype in ("F64", "F32", "F16", "BF16"))

    def read(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tensor `name` in `dtype` (floating-point tensors only are converted)."""
        if name not in self._entries:
            raise UserError(f"{self.folder} holds no tensor {name!r}; the checkpoint does not match its config")
        path, stored, shape, start, end = self._entries[name]
        source = _DTYPES[stored]
        convert = source.is_floating_point and source != dtype
        out = torch.empty(shape, dtype=dtype if convert else source)
        flat = out.view(-1)
        step = max(1, READ_CHUNK // source.itemsize)  # a bf16 matrix converts a chunk at a time, never whole twice
        raw = torch.empty(min(step, flat.numel()) * source.itemsize, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(start)
            for first in range(0, flat.numel(), step):
                count = min(step, flat.numel() - first)
                chunk = raw[: count * source.itemsize]
                if f.readinto(memoryview(chunk.numpy())) != chunk.numel():
                    raise UserError(f"{path}: tensor {name} is truncated; the shard is damaged")
                flat[first : first + count] = chunk.view(source)
        return out


def build_skeleton(source: str | Path):
    """The stock transformers model of the folder's config, every parameter on the meta device,
    in eval mode; `tie_word_embeddings` ties lm_head to the embedding as `from_pretrained` does."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def _checkpoint_names(name: str, moe: MoESpec | None) -> tuple[str, list[str]]:
    """Where parameter `name` is in a checkpoint: its own name, or, for an MoE block, the name under
    the checkpoint's block name and, for fused experts, the per-expert weights to stack (the
    first expert's `{e}` left to fill)."""
    if moe is None:
        return name, []
    renamed = name.replace(f".{moe.block}.", f".{moe.checkpoint_block}.", 1)
    owner, _, attr = renamed.rpartition(".")
    gate, up, down = moe.checkpoint_expert_linears
    parts = {moe.gate_up: (gate, up), moe.down: (down,)}.get(attr, ()) if owner.endswith(moe.experts.rpartition(".")[2]) else ()
    return renamed, [f"{owner}.{{e}}.{part}.weight" for part in parts]


def _expert_count(checkpoint: Checkpoint, patterns: list[str]) -> int:
    e = 0
    while all(p.format(e=e) in checkpoint for p in patterns):
        e += 1
    return e


def read_parameter(checkpoint: Checkpoint, name: str, moe: MoESpec | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Parameter `name` of the model from the checkpoint. Fused experts (`...experts.gate_up_proj`,
    `...experts.down_proj`) of a checkpoint that stores one tensor per expert, as transformers 5
    saves them, are stacked here as transformers stacks them when it loads."""
    if name in checkpoint:
        return checkpoint.read(name, dtype)
    renamed, per_expert = _checkpoint_names(name, moe)
    if renamed in checkpoint:
        return checkpoint.read(renamed, dtype)
    count = _expert_count(checkpoint, per_expert) if per_expert else 0
    if count == 0:
        return checkpoint.read(name, dtype)  # says which tensor is missing
    return torch.stack([torch.cat([checkpoint.read(p.format(e=e), dtype) for p in per_expert]) for e in range(count)])


def check_complete(model: nn.Module, checkpoint: Checkpoint, moe: MoESpec | None = None) -> None:
    """Every parameter of the model is in the checkpoint (a tied lm_head shares the embedding's;
    fused experts may be stored one tensor per expert): checked before any work, so a missing
    tensor fails in the first second, not at the last layer."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}  # transformers 5: tied name -> its source
    missing = []
    for name, param in model.named_parameters():
        renamed, per_expert = _checkpoint_names(name, moe)
        if name in checkpoint or tied.get(name) in checkpoint or renamed in checkpoint:
            continue
        if per_expert and _expert_count(checkpoint, per_expert) == param.shape[0]:
            continue
        missing.append(name)
    if missing:
        raise UserError(
            f"{checkpoint.folder} lacks {len(missing)} of the model's tensors (first: {missing[0]}); a shard is incomplete or the checkpoint "
            "names its tensors differently from this transformers version"
        )


def onload(module: nn.Module, prefix: str, checkpoint: Checkpoint, dtype: torch.dtype = torch.float32, moe: MoESpec | None = None) -> None:
    """Fill the meta parameters of `module` (whose path in the model is `prefix`) from the checkpoint."""
    for local, param in list(module.named_parameters(remove_duplicate=False)):
        if param.device.type != "meta":
            continue
        owner_path, _, attr = local.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        value = read_parameter(checkpoint, f"{prefix}.{local}" if prefix else local, moe, dtype)
        if tuple(value.shape) != tuple(param.shape):
            raise UserError(f"{checkpoint.folder}: tensor {prefix}.{local} has shape {tuple(value.shape)}, the config says {tuple(param.shape)}")
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)


def offload(module: nn.Module) -> None:
    """Turn every parameter and buffer of `module` into a meta tensor: its memory is released."""
    module.to("meta")
