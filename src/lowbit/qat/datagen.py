"""Sharded, resumable data-free generation for LLM-QAT (`lowbit generate-data`).

Shard i holds sequences [i * shard_size, (i + 1) * shard_size) and is generated with its own
generator seeded from (seed, i), so any shard can be (re)generated alone: a run that was
interrupted resumes at the first missing shard and writes exactly what an uninterrupted run
writes. Each shard is written to a temporary file and renamed into place (a shard on disk is
always complete). `meta.json` records the settings; resuming with other settings is refused.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..data.generate import Sampling, generate_batch
from ..errors import UserError
from ..files import write_file_atomically
from ..io.tensorfile import write_safetensors
from ..progress import progress_bar

log = logging.getLogger("lowbit")

META = "meta.json"
STATS = "stats.json"
SHARD = "shard-{:05d}.safetensors"
OLD_SHARDS = "shard-*.pt"  # written by lowbit before shards were safetensors (pickles: never read)


@dataclass(frozen=True)
class DatagenConfig:
    samples: int = 256
    max_length: int = 256
    shard_size: int = 64
    batch_size: int = 32
    seed: int = 0
    sampling: Sampling = field(default_factory=lambda: Sampling(stop_at_eos=True))

    def check(self) -> None:
        if self.samples < 1 or self.max_length < 2:
            raise UserError(f"generation needs at least 1 sequence of at least 2 tokens; got {self.samples} x {self.max_length}")
        if self.shard_size < 1 or self.batch_size < 1:
            raise UserError(f"shard size and batch size must be at least 1; got {self.shard_size} and {self.batch_size}")
        self.sampling.check()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sampling"]["greedy_tokens"] = list(self.sampling.greedy_tokens)
        return d

    @property
    def shards(self) -> int:
        return -(-self.samples // self.shard_size)


def shard_path(out: Path, index: int) -> Path:
    return out / SHARD.format(index)


def _check_meta(out: Path, meta: dict) -> None:
    path = out / META
    if path.is_file():
        old = json.loads(path.read_text())
        if old != meta:
            changed = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise UserError(
                f"{out} holds data generated with other settings ({', '.join(changed)} differ); use a new --out folder or the same settings to resume"
            )
    elif any(out.glob("shard-*")):
        raise UserError(f"{out} has shards but no {META}; use an empty --out folder")
    else:
        write_file_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))


def generate_dataset(model: nn.Module, tokenizer, out: str | Path, config: DatagenConfig | None = None, progress: bool = True) -> dict:
    """Generate (or finish generating) the shards in `out`; returns the summary statistics."""
    config = config or DatagenConfig()
    config.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": getattr(model, "lowbit_source", None) or model.config.name_or_path, **config.to_dict()}
    if any(out.glob(OLD_SHARDS)):
        raise UserError(f"{out} holds shards in an old format (.pt pickles, which lowbit never loads); use a new --out folder")
    _check_meta(out, meta)
    todo = [i for i in range(config.shards) if not shard_path(out, i).is_file()]
    if len(todo) < config.shards:
        log.info("resuming: %d of %d shards already in %s", config.shards - len(todo), config.shards, out)
    bar = progress_bar(
        total=sum(_shard_count(config, i) for i in todo) * config.max_length, desc="generating", unit="tok", unit_scale=True, disable=not progress
    )
    start, tokens = time.time(), 0
    for index in todo:
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
        count, seqs = _shard_count(config, index), []
        while len(seqs) < count:
            n = min(config.batch_size, count - len(seqs))
            before = bar.n
            seqs += generate_batch(model, tokenizer, n, config.max_length, gen, config.sampling, bar)
            bar.update(n * config.max_length - (bar.n - before))  # stopped sequences count as done
        tokens += sum(s.numel() for s in seqs)
        ids = torch.cat([s.view(-1) for s in seqs]).to(torch.int32)
        lengths = torch.tensor([s.numel() for s in seqs], dtype=torch.int32)
        shard = {"ids": ids, "lengths": lengths}
        write_file_atomically(shard_path(out, index), lambda tmp, shard=shard: write_safetensors(tmp, shard))
    bar.close()
    seconds = time.time() - start
    stats = dataset_stats(load_dataset(out))
    stats["generated_tokens_this_run"] = tokens
    stats["seconds_this_run"] = seconds
    stats["tokens_per_second_this_run"] = tokens / seconds if seconds > 0 and tokens else None
    write_file_atomically(out / STATS, lambda tmp: Path(tmp).write_text(json.dumps(stats, indent=2) + "\n"))
    return stats


def _shard_count(config: DatagenConfig, index: int) -> int:
    return min(config.shard_size, config.samples - index * config.shard_size)


def load_dataset(path: str | Path) -> list[torch.Tensor]:
    """Every sequence of a generated dataset, in order, as 1-D int64 token-id tensors."""
    path = Path(path)
    if not (path / META).is_file():
        raise UserError(f"{path} is not a generated dataset (no {META}); create one with lowbit generate-data --out {path}")
    if any(path.glob(OLD_SHARDS)):
        raise UserError(f"{path} holds shards in an old format (.pt pickles, which lowbit never loads); generate the data again")
    try:
        meta = json.loads((path / META).read_text())
        shards = -(-int(meta["samples"]) // int(meta["shard_size"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path / META} is damaged ({exc}); generate the data again") from None
    missing = [i for i in range(shards) if not shard_path(path, i).is_file()]
    if missing:
        raise UserError(f"{path} is incomplete ({len(missing)} of {shards} shards missing); rerun lowbit generate-data to finish it")
    seqs: list[torch.Tensor] = []
    for i in range(shards):
        try:
            shard = load_file(str(shard_path(path, i)))
            seqs += [s.long() for s in torch.split(shard["ids"], shard["lengths"].tolist())]
        except (SafetensorError, OSError, KeyError, RuntimeError) as exc:
            raise UserError(f"{shard_path(path, i)} is damaged ({exc}); delete it and rerun lowbit generate-data to redo it") from None
    return seqs


def distinct_ngram_ratio(seqs: list[torch.Tensor], n: int) -> float:
    """Distinct n-grams / all n-grams over the whole set (a diversity measure)."""
    grams: Counter = Counter()
    for s in seqs:
        ids = s.tolist()
        grams.update(tuple(ids[i : i + n]) for i in range(len(ids) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


def dataset_stats(seqs: list[torch.Tensor]) -> dict:
    lengths = torch.tensor([s.numel() for s in seqs], dtype=torch.float)
    return {
        "sequences": len(seqs),
        "tokens": int(lengths.sum()),
        "length": {
            "min": int(lengths.min()),
            "mean": float(lengths.mean()),
            "median": float(lengths.median()),
            "max": int(lengths.max()),
            "quartiles": [float(q) for q in torch.quantile(lengths, torch.tensor([0.25, 0.5, 0.75]))],
        },
        "distinct_ngram_ratio": {str(n): distinct_ngram_ratio(seqs, n) for n in (1, 2, 3, 4)},
    }


def generated_calibration(dataset: list[torch.Tensor], samples: int, seq_len: int) -> list[torch.Tensor]:
    """Calibration batches [1, seq_len] from generated sequences. They differ in length (generation
    stops at end of sequence) and the layer-by-layer pipeline needs one length, so the sequences
    are joined in order and cut into windows, as calibration text is; fewer, shorter windows if
    there are not enough tokens."""
    stream = torch.cat([s.reshape(-1) for s in dataset])
    length = min(seq_len, stream.numel())
    count = min(samples, stream.numel() // length)
    if count < 1 or length < 2:
        raise UserError(f"the generated data holds {stream.numel()} tokens, too few to calibrate; generate more sequences")
    return list(stream[: count * length].view(count, 1, length))
