"""torch.distributed for lowbit: the process group `torchrun` describes, this process's share of
the calibration samples, and the few collectives calibration needs.

Every function works without a process group (one process): the share is everything and the
collectives return their input. Tensors travel on the backend's device (CUDA for NCCL, CPU for
gloo) and come back where they were; gathered and broadcast tensors travel as bytes, so any dtype
(float8 scales, int16 codes) crosses any backend.
"""

from __future__ import annotations

import dataclasses
import math
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import UserError

# Rank 0 alone evaluates full-precision perplexity before calibration while the other ranks wait
# in their first collective: the default 30 minutes can be too short for a large model on CPUs.
PROCESS_GROUP_TIMEOUT = timedelta(hours=4)
_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def launched_processes() -> int:
    """Processes in this run: the process group's, or what torchrun announced (WORLD_SIZE) before
    the group exists, so that input errors are found before anything starts."""
    return world_size() if world_size() > 1 else int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> torch.device:
    """Join the process group torchrun describes (if any) and return this rank's device: NCCL and
    GPU LOCAL_RANK where CUDA is available, gloo and the CPU otherwise."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if torch.cuda.is_available() and local > torch.cuda.device_count():
        raise UserError(
            f"torchrun started {local} processes on this machine, which has {torch.cuda.device_count()} GPU(s): NCCL needs one GPU "
            "per process; use --nproc-per-node at most that, or CUDA_VISIBLE_DEVICES= to calibrate on CPUs (gloo)"
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def check_processes(samples: int, what: str = "calibration sample(s)") -> None:
    """Each process needs at least one sample of its own."""
    world = launched_processes()
    if world > samples:
        raise UserError(
            f"{world} processes but {samples} {what}: each process needs one at least; "
            f"use at most {samples} processes (--nproc-per-node) or more samples (--calib-samples)"
        )


def check_device(device: str | None) -> None:
    """`--device cuda` under torchrun: each process runs on its own GPU (LOCAL_RANK), so there
    must be as many GPUs as processes on this machine."""
    try:
        kind = torch.device(device).type if device is not None else None
    except RuntimeError:  # not a device name: PipelineConfig.check says so
        return
    if kind != "cuda" or launched_processes() == 1:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", launched_processes()))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if local > gpus:
        raise UserError(f"--device {device} with {local} processes on a machine with {gpus} GPU(s): use at most {gpus} processes, or no --device")


def share(count: int, block: int = 1) -> slice:
    """This rank's contiguous share of `count` items (calibration samples). With `block` > 1 the
    shares are whole blocks (the pipeline's batches) when there are at least as many blocks as
    processes, so every batch a rank runs is a batch one process would run; otherwise items.
    One process: everything."""
    world, r = world_size(), rank()
    blocks = -(-count // block)
    if blocks >= world:
        return slice(min(count, r * blocks // world * block), min(count, (r + 1) * blocks // world * block))
    return slice(r * count // world, (r + 1) * count // world)


def assign_by_size(sizes: list[int], world: int | None = None) -> list[int]:
    """An owner rank per item, balanced by size: largest first, each to the least-loaded rank
    (ties: the lowest rank), as llm-compressor's distributed GPTQ assigns modules by weight numel."""
    world = world or world_size()
    load = [0] * world
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        owners[i] = min(range(world), key=lambda r: (load[r], r))
        load[owners[i]] += sizes[i]
    return owners


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce `tensor` over all ranks in place (sum, min or max); every rank gets the same values."""
    if world_size() == 1:
        return tensor
    device = _comm_device()
    buf = tensor if tensor.device == device and tensor.is_contiguous() else tensor.to(device).contiguous()
    dist.all_reduce(buf, op=_OPS[op])
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def reduce_count(count: int) -> int:
    """The sum of an integer over all ranks."""
    return int(all_reduce_(torch.tensor([count], dtype=torch.int64)).item())


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' `tensor`s ([rows, ...], rows may differ) concatenated along dim 0 in rank order,
    on every rank (on `tensor`'s device)."""
    world = world_size()
    if world == 1:
        return tensor
    device = _comm_device()
    counts = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=device)
    every = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(every, counts)
    counts = [int(c.item()) for c in every]
    row = math.prod(tensor.shape[1:]) * tensor.element_size()
    longest = max(counts) * row
    if longest == 0:
        return tensor.new_empty(0, *tensor.shape[1:])
    mine = torch.zeros(longest, dtype=torch.uint8, device=device)
    mine[: tensor.numel() * tensor.element_size()] = _as_bytes(tensor).to(device)
    parts = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(parts, mine)
    rows = [p[: n * row].view(tensor.dtype).reshape(n, *tensor.shape[1:]) for p, n in zip(parts, counts)]
    return torch.cat(rows).to(tensor.device)


def _map(obj, leaf: type, fn):
    """`obj` with `fn` applied to every `leaf` instance in its dicts, lists, tuples and dataclasses."""
    if isinstance(obj, leaf):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map(v, leaf, fn) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_map(v, leaf, fn) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changed = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            new = _map(value, leaf, fn)
            if new is not value:
                changed[f.name] = new
        return dataclasses.replace(obj, **changed) if changed else obj
    return obj


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where a tensor was in a broadcast object: its place in the sent order, shape and dtype."""

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def broadcast_object(obj, src: int, device: torch.device | str = "cpu"):
    """`obj` (picklable; tensors anywhere in its dicts, lists, tuples and dataclasses) from rank
    `src` to every rank. The tensors travel as tensors, not pickled; on the other ranks they
    arrive on `device`, on `src` the object is returned as it is."""
    if world_size() == 1:
        return obj
    tensors: list[torch.Tensor] = []

    def slot(t: torch.Tensor) -> _Slot:
        tensors.append(t)
        return _Slot(len(tensors) - 1, tuple(t.shape), t.dtype)

    skeleton = [_map(obj, torch.Tensor, slot) if rank() == src else None]
    dist.broadcast_object_list(skeleton, src=src)
    slots: list[_Slot] = []
    _map(skeleton[0], _Slot, slots.append)
    comm = _comm_device()
    received = []
    for s in sorted(slots, key=lambda s: s.index):
        nbytes = math.prod(s.shape) * s.dtype.itemsize
        if nbytes == 0:
            received.append(torch.empty(s.shape, dtype=s.dtype, device=device))
            continue
        buf = _as_bytes(tensors[s.index]).to(comm) if rank() == src else torch.empty(nbytes, dtype=torch.uint8, device=comm)
        dist.broadcast(buf, src=src)
        received.append(buf.to(device).view(s.dtype).reshape(s.shape))
    return obj if rank() == src else _map(skeleton[0], _Slot, lambda s: received[s.index])
