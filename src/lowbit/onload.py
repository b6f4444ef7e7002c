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
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

log = logging.getLogger("lowbit")

INDEX_FILE = "model.safetensors.index.json"


class Checkpoint:
    """The safetensors tensors of a transformers model folder, read one at a time."""

    def __init__(self, folder: str | Path) -> None:
        from safetensors import SafetensorError, safe_open

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
        self._handles = {}
        self._file_of: dict[str, str] = {}
        for name in files:
            try:
                handle = safe_open(str(self.folder / name), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise UserError(f"{self.folder / name} cannot be read ({str(exc)[:160]}); the shard is truncated or corrupted") from None
            self._handles[name] = handle
            for key in handle.keys():
                self._file_of[key] = name

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def keys(self) -> list[str]:
        return list(self._file_of)

    def dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's floating-point tensors (the first one found)."""
        for key, name in self._file_of.items():
            dtype = self._handles[name].get_slice(key).get_dtype()
            if dtype in ("F32", "F16", "BF16"):
                return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype]
        return torch.float32

    def read(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tensor `name` in `dtype` (floating-point tensors only are converted)."""
        if name not in self._file_of:
            raise UserError(f"{self.folder} holds no tensor {name!r}; the checkpoint does not match its config")
        tensor = self._handles[self._file_of[name]].get_tensor(name)
        return tensor.to(dtype) if tensor.is_floating_point() and tensor.dtype != dtype else tensor


def float32_bytes(folder: str | Path) -> int:
    """Bytes the floating-point tensors of the folder's checkpoint take in float32 (from the headers)."""
    checkpoint = Checkpoint(folder)
    total = 0
    for key, name in checkpoint._file_of.items():
        piece = checkpoint._handles[name].get_slice(key)
        if piece.get_dtype() in ("F32", "F16", "BF16", "F64"):
            total += 4 * math.prod(piece.get_shape())
    return total


def build_skeleton(source: str | Path):
    """The stock transformers model of the folder's config, every parameter on the meta device,
    in eval mode; `tie_word_embeddings` ties lm_head to the embedding as `from_pretrained` does."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def check_complete(model: nn.Module, checkpoint: Checkpoint) -> None:
    """Every parameter of the model is in the checkpoint (a tied lm_head shares the embedding's):
    checked before any work, so a missing tensor fails in the first second, not at the last layer."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}  # transformers 5: tied name -> its source
    missing = [name for name, _ in model.named_parameters() if name not in checkpoint and tied.get(name) not in checkpoint]
    if missing:
        raise UserError(
            f"{checkpoint.folder} lacks {len(missing)} of the model's tensors (first: {missing[0]}); a shard is incomplete or the checkpoint "
            "names its tensors differently from this transformers version"
        )


def onload(module: nn.Module, prefix: str, checkpoint: Checkpoint, dtype: torch.dtype = torch.float32) -> None:
    """Fill the meta parameters of `module` (whose path in the model is `prefix`) from the checkpoint."""
    for local, param in list(module.named_parameters(remove_duplicate=False)):
        if param.device.type != "meta":
            continue
        owner_path, _, attr = local.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        value = checkpoint.read(f"{prefix}.{local}" if prefix else local, dtype)
        if tuple(value.shape) != tuple(param.shape):
            raise UserError(f"{checkpoint.folder}: tensor {prefix}.{local} has shape {tuple(value.shape)}, the config says {tuple(param.shape)}")
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)


def offload(module: nn.Module) -> None:
    """Turn every parameter and buffer of `module` into a meta tensor: its memory is released."""
    module.to("meta")


def is_onloaded(module: nn.Module) -> bool:
    return all(p.device.type != "meta" for p in module.parameters())
