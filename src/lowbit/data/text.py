"""Text sources for evaluation and calibration: a file, the offline default corpus, or a hub dataset.

enwiki-sample     the Wikipedia sample in the gensim wheel (offline; held-out half for eval)
wikitext2         WikiText-2 raw from the datasets hub (test split for eval, train for calibration)
org/name[:config] any hub dataset with a 'text' column
PATH              a UTF-8 text file
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

from ..errors import UserError
from . import enwiki

DEFAULT_DATA = enwiki.NAME
HUB_ALIASES = {"wikitext2": ("wikitext", "wikitext-2-raw-v1"), "wikitext-2": ("wikitext", "wikitext-2-raw-v1")}


def load_text(source: str | None = None, split: str = "eval") -> str:
    """The text of `source`; `split` is 'eval' (held out) or 'calib'."""
    if split not in ("eval", "calib"):
        raise ValueError(f"split must be 'eval' or 'calib', got {split!r}")
    source = source or DEFAULT_DATA
    if source == enwiki.NAME:
        return enwiki.split_text(split)
    path = Path(source).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{path} is not a UTF-8 text file") from None
    if path.exists():
        raise UserError(f"{path} is a folder; give a text file")
    if source in HUB_ALIASES or re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", source):
        return _hub_text(source, split)
    if path.suffix or os.sep in source:
        raise UserError(f"text file not found: {path}")
    raise UserError(f"unknown data {source!r}: give a text file, {enwiki.NAME!r} (offline default), 'wikitext2' or a hub dataset id")


def _hub_text(source: str, split: str) -> str:
    name, config = HUB_ALIASES.get(source, (source.split(":")[0], source.partition(":")[2] or None))
    try:
        import datasets
    except ImportError:
        raise UserError(f"dataset {source!r} comes from the hub and needs: pip install 'lowbit[hub]' (or pass a text file)") from None
    hub_split = "test" if split == "eval" else "train"
    try:
        rows = datasets.load_dataset(name, config, split=hub_split)
    except Exception as exc:  # the datasets library raises many types for "offline" / "not found"
        raise UserError(
            f"cannot load dataset {source!r} ({hub_split} split) from the hub: {str(exc).splitlines()[0]}. "
            "Offline, pass a local text file instead (e.g. --data path/to/wiki.test.raw)"
        ) from None
    if "text" not in rows.column_names:
        raise UserError(f"dataset {source!r} has no 'text' column (columns: {', '.join(rows.column_names)})")
    return "\n\n".join(rows["text"])  # the join of the GPTQ perplexity protocol


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text tokenized once, as a 1-D LongTensor (the tokenizer's own special tokens)."""
    if not text or not text.strip():
        raise UserError("the text is empty")
    # A long text exceeds model_max_length on purpose: it is cut into windows afterwards.
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)
    ids = tokenizer(text, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_batches(tokenizer, source: str | None, samples: int, seq_len: int, seed: int = 0) -> list[torch.Tensor]:
    """`samples` windows of `seq_len` tokens from the calibration split of `source`, drawn at random
    (seeded) from the text's non-overlapping windows, so no token is used twice."""
    if samples < 1 or seq_len < 2:
        raise UserError(f"calibration needs at least 1 sample of at least 2 tokens; got {samples} x {seq_len}")
    ids = tokenize(tokenizer, load_text(source, split="calib"))
    available = ids.numel() // seq_len
    if available < samples:
        raise UserError(
            f"calibration text {source or DEFAULT_DATA!r} has {ids.numel()} tokens: {available} windows of {seq_len}, "
            f"fewer than the {samples} samples requested; use fewer samples (--calib-samples), shorter ones "
            "(--calib-seq-len) or a longer text"
        )
    gen = torch.Generator().manual_seed(seed)
    offset = int(torch.randint(0, ids.numel() - available * seq_len + 1, (1,), generator=gen))
    picks = torch.randperm(available, generator=gen)[:samples]
    return [ids[offset + p * seq_len : offset + (p + 1) * seq_len].unsqueeze(0) for p in picks.tolist()]
