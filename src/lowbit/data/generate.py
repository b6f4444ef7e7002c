"""Data-free text: sequences the model writes itself (the generation of LLM-QAT, section 2.1).

Each sequence starts from a random vocabulary token (never a special token). With the hybrid
strategy (the paper's) the first k tokens (k drawn from `greedy_tokens` per sequence) are decoded
greedily and the rest sampled from the softmax; `greedy` decodes top-1 all the way and `sample`
samples from the first token on (the paper's ablation, Table 3). Sequences are generated in
batches with the KV cache. For calibration every sequence has exactly `length` tokens (end of
sequence is never sampled); with `stop_at_eos` a sequence ends at the first end-of-sequence token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from ..progress import progress_bar

STRATEGIES = ("hybrid", "greedy", "sample")


@dataclass(frozen=True)
class Sampling:
    """How each next token is chosen."""

    strategy: str = "hybrid"
    greedy_tokens: tuple[int, ...] = (3, 4, 5)  # hybrid: k greedy tokens after the start token
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    stop_at_eos: bool = False

    def check(self) -> None:
        if self.strategy not in STRATEGIES:
            raise UserError(f"unknown generation strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.temperature <= 0:
            raise UserError(f"temperature must be positive; got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top_k must be at least 1; got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1]; got {self.top_p}")
        if not self.greedy_tokens or min(self.greedy_tokens) < 0:
            raise UserError(f"greedy_tokens must be non-negative counts; got {self.greedy_tokens}")


def start_tokens(tokenizer, vocab_size: int) -> torch.Tensor:
    """Token ids a sequence may start from: the vocabulary minus special tokens."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    size = min(vocab_size, len(tokenizer)) if tokenizer is not None else vocab_size
    allowed = torch.tensor([i for i in range(size) if i not in special], dtype=torch.long)
    if allowed.numel() == 0:
        raise UserError("the tokenizer has no non-special tokens to start generation from")
    return allowed


def end_token(tokenizer) -> int | None:
    eos = getattr(tokenizer, "eos_token_id", None)
    return eos if isinstance(eos, int) else None


@torch.no_grad()
def generate_batch(
    model: nn.Module,
    tokenizer,
    n: int,
    length: int,
    gen: torch.Generator,
    sampling: Sampling = Sampling(),
    bar=None,  # a progress bar to advance (tqdm interface)
) -> list[torch.Tensor]:
    """`n` sequences generated together with the KV cache: [1, <= length] token ids each (exactly
    `length` unless `sampling.stop_at_eos`; a stopped sequence ends with its end-of-sequence token)."""
    allowed = start_tokens(tokenizer, model.config.vocab_size)
    eos = end_token(tokenizer) if sampling.stop_at_eos else None
    banned = sorted(set(getattr(tokenizer, "all_special_ids", []) or []) - {eos})
    device = next(model.parameters()).device
    first = allowed[torch.randint(0, allowed.numel(), (n,), generator=gen)]
    greedy = torch.tensor(sampling.greedy_tokens)[torch.randint(0, len(sampling.greedy_tokens), (n,), generator=gen)]
    if sampling.strategy == "greedy":
        greedy.fill_(length)
    elif sampling.strategy == "sample":
        greedy.zero_()
    seqs = first.view(n, 1)
    ends = torch.full((n,), length)  # tokens each sequence keeps
    past = None
    step_input = seqs
    for t in range(1, length):
        result = model(input_ids=step_input.to(device), past_key_values=past, use_cache=True)
        past = result.past_key_values
        logits = result.logits[:, -1].float().cpu()
        if banned:
            logits[:, banned] = float("-inf")
        chosen = logits.argmax(-1)
        if sampling.strategy != "greedy":
            sampled = sample_next(logits, gen, sampling.temperature, sampling.top_k, sampling.top_p)
            chosen = torch.where(t <= greedy, chosen, sampled)  # t tokens exist: greedy for the first k
        step_input = chosen.view(n, 1)
        seqs = torch.cat([seqs, step_input], dim=1)
        if bar is not None:
            bar.update(int((ends > t).sum()))
        if eos is not None:
            ends = torch.where((chosen == eos) & (ends == length), torch.full_like(ends, t + 1), ends)
            if bool((ends < length).all()):
                break
    if bar is not None:
        bar.update(n)
    return [s[: int(e)].view(1, -1) for s, e in zip(seqs, ends)]


def generate_samples(
    model: nn.Module,
    tokenizer,
    samples: int,
    length: int,
    *,
    seed: int = 0,
    batch_size: int = 8,
    greedy_tokens: tuple[int, ...] = (3, 4, 5),
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    strategy: str = "hybrid",
    progress: bool = True,
) -> list[torch.Tensor]:
    """`samples` sequences of `length` token ids ([1, length] each), reproducible from `seed`."""
    if samples < 1 or length < 2:
        raise UserError(f"generation needs at least 1 sample of at least 2 tokens; got {samples} x {length}")
    sampling = Sampling(strategy, tuple(greedy_tokens), temperature, top_k, top_p)
    sampling.check()
    gen = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    bar = progress_bar(total=samples * length, desc="generating calibration text", unit="tok", disable=not progress, leave=False)
    for start in range(0, samples, batch_size):
        out += generate_batch(model, tokenizer, min(batch_size, samples - start), length, gen, sampling, bar)
    bar.close()
    return out


def sample_next(
    logits: torch.Tensor, gen: torch.Generator, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """One token per row from softmax(logits / temperature), optionally restricted to the top k
    tokens or the smallest set whose probability reaches top_p."""
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep tokens until top_p is reached
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen).view(-1)
