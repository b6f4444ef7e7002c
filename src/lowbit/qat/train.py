"""The LLM-QAT training loop: distil the full-precision teacher into the quantized student.

The student is a lowbit quantized model built with `trainable=True`: its `QuantLinear`s keep
latent weights that are fake-quantized in every forward, and activation and KV quantizers pass
gradients straight through (STE), so the optimizer (AdamW, weight decay 0, lr 2e-5, cosine decay,
as in LLM-QAT) updates the latent weights of every quantized linear; everything else is frozen.

The data order is a function of (seed, step) only, and a checkpoint holds the trainable weights,
the optimizer and the schedule, so a resumed run continues exactly where it stopped. Under
`torchrun` (torch.distributed initialised, world size > 1) the student is wrapped in DDP, or
sharded with FSDP (`fsdp=True`), and each rank trains on its own slice of every batch. Under
FSDP a checkpoint holds the whole (gathered) weights and optimizer state, written by rank 0 and
read back by every rank into its shards, and `gather_weights` collects the trained weights for
the rank that evaluates and saves the student.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import rank, world_size
from ..errors import UserError
from ..files import write_file_atomically
from ..io.tensorfile import load_tree, save_tree
from ..progress import progress_bar
from ..runtime.kv import register_attention, set_attention_implementation
from ..runtime.linear import QuantLinear
from . import distill

log = logging.getLogger("lowbit")

CHECKPOINT = "checkpoint.safetensors"  # tensors and a JSON skeleton: loading one runs no code
SCHEDULES = ("cosine", "constant")


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 8  # sequences per optimizer step, over all ranks and accumulation steps
    grad_accum: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine decay to 0 after warm-up, or constant
    max_seq_len: int = 256
    losses: dict[str, float] = field(default_factory=lambda: {"logits": 1.0})
    teacher_topk: int | None = None  # cache the teacher's top-k probabilities instead of recomputing
    bf16: bool = False  # autocast the forward passes to bfloat16
    grad_checkpointing: bool = False
    fsdp: bool = False
    checkpoint_every: int = 0  # 0: only at the end
    seed: int = 0
    learn_scales: bool = False  # train the per-row weight scales too (LSQ), not only the latent weights
    scale_lr: float | None = None  # learning rate of the scales (None: lr)

    def check(self, world: int = 1) -> None:
        distill.check_losses(self.losses)
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1 or self.max_seq_len < 2:
            raise UserError("steps, batch size and gradient accumulation must be at least 1, max_seq_len at least 2")
        if self.batch_size % (self.grad_accum * world):
            raise UserError(f"batch size {self.batch_size} must be a multiple of grad_accum x processes = {self.grad_accum} x {world}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule {self.schedule!r}; choose {' or '.join(SCHEDULES)}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise UserError("lr must be positive, warm-up steps and weight decay non-negative")
        if self.scale_lr is not None and (self.scale_lr <= 0 or not self.learn_scales):
            raise UserError("scale_lr must be positive and needs learn_scales (--learn-scales)")
        if self.teacher_topk is not None and (self.teacher_topk < 1 or set(self.losses) - {"logits", "label"}):
            raise UserError("teacher_topk must be at least 1 and works with the logits (and label) losses only")

    @property
    def micro_batch(self) -> int:
        return self.batch_size // (self.grad_accum * world_size())


def trainable_parameters(student: nn.Module) -> dict[str, nn.Parameter]:
    """Freeze everything but the latent weights (and biases) of the trainable quantized linears,
    and their weight scales where they learn them."""
    linears = [m for m in student.modules() if isinstance(m, QuantLinear) and m.trainable]
    if not linears:
        raise UserError("the student has no trainable quantized linears; build it with quantize_model(..., trainable=True)")
    keep = {id(p) for m in linears for p in (m.weight, m.bias, m.weight_scale) if isinstance(p, nn.Parameter)}
    params = {}
    for name, p in student.named_parameters():
        p.requires_grad_(id(p) in keep)
        if id(p) in keep:
            params[name] = p
    return params


def learn_weight_scales(student: nn.Module) -> nn.Module:
    """Make the weight scales of every trainable quantized linear trainable too (LSQ)."""
    for module in student.modules():
        if isinstance(module, QuantLinear) and module.trainable and module.weight_args is not None:
            module.learn_weight_scale()
    return student


def freeze_student(student: nn.Module) -> nn.Module:
    """End QAT: every trainable quantized linear keeps its quantized weight (no latent weight left)."""
    for module in student.modules():
        if isinstance(module, QuantLinear):
            module.freeze()
    return student


def batch_indices(step: int, micro: int, config: TrainConfig, dataset_size: int) -> list[int]:
    """The sequences this rank trains on at (step, micro-batch): a seeded permutation per epoch."""
    per_rank = config.micro_batch
    world = world_size()
    start = ((step * config.grad_accum + micro) * world + rank()) * per_rank
    out = []
    for position in range(start, start + per_rank):
        epoch, offset = divmod(position, dataset_size)
        order = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(config.seed * 7919 + epoch))
        out.append(int(order[offset]))
    return out


def collate(seqs: list[torch.Tensor], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [batch, tokens] ids and the attention mask."""
    seqs = [s.view(-1)[:max_len] for s in seqs]
    length = max(s.numel() for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : s.numel()] = s
        mask[i, : s.numel()] = 1
    return ids, mask


def lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))


def _use_eager_attention(model: nn.Module) -> None:
    """Attention distillation needs the attention probabilities: only eager attention returns them."""
    current = model.config._attn_implementation or "eager"
    set_attention_implementation(model, register_attention("eager") if current.startswith("lowbit_") else "eager")


def _wrap_distributed(student: nn.Module, config: TrainConfig, device: torch.device) -> nn.Module:
    if world_size() == 1:
        return student
    if config.fsdp:
        from torch.distributed.fsdp import fully_shard

        from ..arch import decoder_layers, get_arch

        for layer in decoder_layers(student, get_arch(student)):
            fully_shard(layer)
        fully_shard(student)
        return student
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # an FSDP shard (DTensor) or a plain tensor


def gather_weights(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """The trainable weights, whole, on CPU. Under FSDP every rank must call it (it all-gathers)."""
    return {n: _whole(p.detach()).cpu().clone() for n, p in params.items()}


def _state_dict_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, strict=False)


def save_checkpoint(
    path: Path,
    step: int,
    params: dict[str, nn.Parameter],
    optimizer,
    history: list[dict],
    config: TrainConfig,
    sharded_model: nn.Module | None = None,
) -> None:
    """Rank 0 writes to a temporary file and renames it: a crash leaves the previous checkpoint
    intact. With `sharded_model` (FSDP) every rank must call it: weights and optimizer state are
    gathered whole first."""
    weights = gather_weights(params)
    if sharded_model is not None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        optimizer_state = get_optimizer_state_dict(sharded_model, optimizer, options=_state_dict_options())
    else:
        optimizer_state = optimizer.state_dict()
    if rank() != 0:
        return
    state = {"step": step, "params": weights, "optimizer": optimizer_state, "history": history, "config": asdict(config)}
    write_file_atomically(path, lambda tmp: save_tree(tmp, state))


def load_checkpoint(
    path: Path, params: dict[str, nn.Parameter], optimizer, config: TrainConfig, sharded_model: nn.Module | None = None
) -> tuple[int, list[dict]]:
    """Restore weights, optimizer and schedule; with `sharded_model` (FSDP) each rank takes its shards."""
    try:
        state = load_tree(path)
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as exc:
        raise UserError(f"checkpoint {path} cannot be read ({str(exc).splitlines()[0][:200]}); delete it to start over") from None
    saved = {k: v for k, v in state["config"].items() if k not in ("steps", "checkpoint_every")}
    now = {k: v for k, v in asdict(config).items() if k not in ("steps", "checkpoint_every")}
    if saved != now:
        changed = sorted(k for k in now if saved.get(k) != now[k])
        raise UserError(f"checkpoint {path} was written with other training settings ({', '.join(changed)}); use a new --out")
    if set(state["params"]) != set(params):
        raise UserError(f"checkpoint {path} does not match this student (other scheme or model?); use a new --out")
    if sharded_model is not None:
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        set_model_state_dict(sharded_model, state["params"], options=_state_dict_options())
        set_optimizer_state_dict(sharded_model, optimizer, state["optimizer"], options=_state_dict_options())
        return state["step"], state["history"]
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["params"][name])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"], state["history"]


def train(
    student: nn.Module,
    teacher: nn.Module,
    dataset: list[torch.Tensor],
    config: TrainConfig | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Distil `teacher` into `student` (in place) for `config.steps` optimizer steps.

    With `checkpoint_dir`, a checkpoint found there is resumed and new ones are written (rank 0).
    Returns the training summary: per-step loss, seconds, tokens seen."""
    config = config or TrainConfig()
    config.check(world_size())
    if not dataset:
        raise UserError("the training data has no sequences")
    device = next(student.parameters()).device
    if config.learn_scales:
        learn_weight_scales(student)
    params = trainable_parameters(student)
    teacher.eval().requires_grad_(False)
    if "attention" in config.losses:
        _use_eager_attention(student)
        _use_eager_attention(teacher)
    if config.grad_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    sharded = config.fsdp and world_size() > 1
    model = _wrap_distributed(student, config, device)
    if sharded:  # fully_shard replaced the parameters with sharded ones: the optimizer must see those
        params = {n: p for n, p in student.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(_param_groups(params, config), weight_decay=config.weight_decay)
    path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None
    step, history = 0, []
    if path is not None and path.is_file():
        step, history = load_checkpoint(path, params, optimizer, config, student if sharded else None)
        log.info("resuming from %s at step %d", path, step)
    want_hidden = "hidden" in config.losses
    want_attn = "attention" in config.losses
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if config.bf16 else nullcontext()
    topk_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    start, tokens = time.time(), 0
    bar = progress_bar(total=config.steps, initial=step, desc="QAT", unit="step", disable=not progress or rank() != 0)
    while step < config.steps:
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, config)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(config.grad_accum):
            index = batch_indices(step, micro, config, len(dataset))
            ids, mask = collate([dataset[i] for i in index], config.max_seq_len)
            ids, mask = ids.to(device), mask.to(device)
            tokens += int(mask.sum())
            with autocast:
                out = model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=want_hidden, output_attentions=want_attn)
                teacher_out = None
                if config.teacher_topk is None or want_hidden or want_attn or "logits" not in config.losses:
                    with torch.no_grad():
                        teacher_out = teacher(
                            input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=want_hidden, output_attentions=want_attn
                        )
            loss = torch.zeros((), device=device)
            for name, weight in config.losses.items():
                if name == "logits" and config.teacher_topk is not None:
                    values, top_ids = _cached_topk(teacher, ids, mask, index, topk_cache, config, autocast)
                    part = distill.topk_cross_entropy(out.logits, values, top_ids, mask)
                elif name == "logits":
                    part = distill.soft_cross_entropy(out.logits, teacher_out.logits, mask)
                elif name == "label":
                    part = distill.label_cross_entropy(out.logits, ids, mask)
                elif name == "hidden":
                    part = distill.hidden_mse(out.hidden_states[1:], teacher_out.hidden_states[1:], mask)
                else:
                    part = distill.attention_cross_entropy(out.attentions, teacher_out.attentions, mask)
                loss = loss + weight * part
            (loss / config.grad_accum).backward()
            total += loss.item() / config.grad_accum
        optimizer.step()
        step += 1
        history.append({"step": step, "loss": total, "lr": optimizer.param_groups[0]["lr"]})
        bar.update(1)
        bar.set_postfix(loss=f"{total:.4f}")
        if path is not None and config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
            _save(path, step, params, optimizer, history, config, student if sharded else None)
    bar.close()
    if path is not None:
        _save(path, step, params, optimizer, history, config, student if sharded else None)
    student.eval()
    if config.grad_checkpointing:
        student.gradient_checkpointing_disable()
    return {"history": history, "seconds": time.time() - start, "tokens_this_run": tokens, "steps": step}


def _param_groups(params: dict[str, nn.Parameter], config: TrainConfig) -> list[dict]:
    """Latent weights and biases at lr; learned weight scales at scale_lr (default lr)."""
    scales = [p for n, p in params.items() if n.endswith("weight_scale")]
    others = [p for n, p in params.items() if not n.endswith("weight_scale")]
    groups = [{"params": others, "lr": config.lr, "base_lr": config.lr}]
    if scales:
        lr = config.scale_lr or config.lr
        groups.append({"params": scales, "lr": lr, "base_lr": lr})
    return groups


def _save(path: Path, step: int, params, optimizer, history, config, sharded_model=None) -> None:
    if rank() == 0 or sharded_model is not None:  # FSDP: every rank takes part in gathering
        save_checkpoint(path, step, params, optimizer, history, config, sharded_model)
    if world_size() > 1:
        dist.barrier()


@torch.no_grad()
def _cached_topk(teacher, ids, mask, index, cache, config, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k logits and ids per position, computed once per sequence and kept."""
    missing = [j for j, i in enumerate(index) if i not in cache]
    if missing:
        with autocast:
            logits = teacher(input_ids=ids[missing], attention_mask=mask[missing], use_cache=False).logits.float()
        values, top_ids = logits.topk(config.teacher_topk, dim=-1)
        for row, j in enumerate(missing):
            n = int(mask[j].sum())
            cache[index[j]] = (values[row, :n].cpu(), top_ids[row, :n].cpu())
    length = ids.shape[1]
    values = torch.zeros(len(index), length, config.teacher_topk)
    top_ids = torch.zeros(len(index), length, config.teacher_topk, dtype=torch.long)
    for j, i in enumerate(index):
        v, t = cache[i]
        values[j, : v.shape[0]], top_ids[j, : t.shape[0]] = v, t
    return values.to(ids.device), top_ids.to(ids.device)
