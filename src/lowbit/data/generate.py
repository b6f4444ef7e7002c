"""Data-free calibration: text the model writes itself (LLM-QAT's generation, seed 001 §2.1).

Each sequence starts from a random vocabulary token (never a special token); the first k tokens
(k drawn from `greedy_tokens` per sequence) are decoded greedily, the rest sampled from the
softmax. Sequences are generated in batches with the KV cache. For calibration every sequence
has exactly `length` tokens: end-of-sequence is never sampled.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import UserError


def start_tokens(tokenizer, vocab_size: int) -> torch.Tensor:
    """Token ids a sequence may start from: the vocabulary minus special tokens."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    size = min(vocab_size, len(tokenizer)) if tokenizer is not None else vocab_size
    allowed = torch.tensor([i for i in range(size) if i not in special], dtype=torch.long)
    if allowed.numel() == 0:
        raise UserError("the tokenizer has no non-special tokens to start generation from")
    return allowed


@torch.no_grad()
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
    progress: bool = True,
) -> list[torch.Tensor]:
    """`samples` sequences of `length` token ids ([1, length] each), reproducible from `seed`."""
    if samples < 1 or length < 2:
        raise UserError(f"generation needs at least 1 sample of at least 2 tokens; got {samples} x {length}")
    if temperature <= 0:
        raise UserError(f"temperature must be positive; got {temperature}")
    gen = torch.Generator().manual_seed(seed)
    allowed = start_tokens(tokenizer, model.config.vocab_size)
    banned = sorted(set(getattr(tokenizer, "all_special_ids", []) or []))
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    bar = tqdm(total=samples * length, desc="generating calibration text", unit="tok", disable=not progress, leave=False)
    for start in range(0, samples, batch_size):
        n = min(batch_size, samples - start)
        first = allowed[torch.randint(0, allowed.numel(), (n,), generator=gen)]
        greedy = torch.tensor(greedy_tokens)[torch.randint(0, len(greedy_tokens), (n,), generator=gen)]
        seqs = first.view(n, 1)
        past = None
        step_input = seqs
        for t in range(1, length):
            result = model(input_ids=step_input.to(device), past_key_values=past, use_cache=True)
            past = result.past_key_values
            logits = result.logits[:, -1].float().cpu()
            if banned:
                logits[:, banned] = float("-inf")
            sampled = sample_next(logits, gen, temperature, top_k, top_p)
            chosen = torch.where(t <= greedy, logits.argmax(-1), sampled)  # t tokens exist: greedy for the first k
            step_input = chosen.view(n, 1)
            seqs = torch.cat([seqs, step_input], dim=1)
            bar.update(n)
        bar.update(n)
        out += [s.view(1, -1) for s in seqs]
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
