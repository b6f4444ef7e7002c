"""Layer inputs of every calibration or evaluation batch, kept in memory up to a budget and on
disk beyond it.

The layer-by-layer passes hold one [batch, tokens, hidden] tensor per batch and overwrite each with
the layer's output. `ActivationStore` is that list: the first batches that fit in `budget_bytes`
live in memory, the rest in raw files (read and written whole with plain file I/O, not memory
maps, so their pages count against the page cache and not against the process). Files hold raw
tensor bytes; nothing is pickled.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .files import temporary_dir

_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}  # bf16 as its bits
_BITS = {torch.bfloat16: torch.int16}


def check_free_space(folder: str | Path, needed: int, what: str = "offloaded activations") -> None:
    """Fail early when `folder`'s disk cannot take `needed` bytes."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise UserError(
            f"{what} need {needed / 2**30:.2f} GiB on disk in {folder}, which has {free / 2**30:.2f} GiB free; "
            "free space there, choose another --offload-dir, or raise --max-memory"
        )


class ActivationStore:
    """A list of tensors (same dtype) with a memory budget; `store[j] = t` overwrites entry j."""

    def __init__(self, budget_bytes: int | None = None, folder: str | Path | None = None) -> None:
        self.budget = budget_bytes
        self._folder_root = Path(folder) if folder is not None else None
        self._folder: Path | None = None
        self._entries: list[torch.Tensor | tuple[Path, tuple, torch.dtype]] = []
        self.resident_bytes = 0
        self.disk_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self):
        return (self[j] for j in range(len(self)))

    def _spill_dir(self) -> Path:
        if self._folder is None:
            # named per process, so a killed run's files are removed by the next run (`sweep_stale`)
            root = self._folder_root or Path(tempfile.gettempdir())
            self._folder = temporary_dir(root / "activations")
        return self._folder

    def append(self, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.budget is None or self.resident_bytes + size <= self.budget:
            self._entries.append(tensor.detach().to("cpu", copy=True))
            self.resident_bytes += size
            return
        path = self._spill_dir() / f"{len(self._entries)}.bin"
        self._entries.append((path, tuple(tensor.shape), tensor.dtype))
        self.disk_bytes += size
        self[len(self._entries) - 1] = tensor

    def __getitem__(self, j: int) -> torch.Tensor:
        entry = self._entries[j]
        if isinstance(entry, torch.Tensor):
            return entry
        path, shape, dtype = entry
        return torch.from_numpy(np.fromfile(path, dtype=_NUMPY[dtype])).view(dtype).view(shape)

    def __setitem__(self, j: int, tensor: torch.Tensor) -> None:
        entry = self._entries[j]
        if isinstance(entry, torch.Tensor):
            entry.copy_(tensor)
            return
        path, shape, dtype = entry
        data = tensor.detach().to("cpu", dtype).contiguous()
        if tuple(data.shape) != shape:
            raise ValueError(f"activation {j} has shape {shape}; got {tuple(data.shape)}")
        try:
            data.view(_BITS.get(dtype, dtype)).numpy().tofile(path)
        except OSError as exc:
            raise UserError(f"cannot write offloaded activations to {path.parent} ({exc.strerror}); free space there or raise --max-memory") from None

    def close(self) -> None:
        """Delete the files of the entries on disk."""
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
        self._entries = []

    def __del__(self) -> None:
        self.close()
