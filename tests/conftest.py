"""Shared fixtures: tiny random-config models of every supported family, and the default model."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"

TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)


def tiny_config(family: str):
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
    )

    classes = {
        "llama": LlamaConfig,
        "mistral": MistralConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
        "gemma2": Gemma2Config,
        "gemma3": Gemma3TextConfig,
    }
    extra = {}
    if family in ("gemma2", "gemma3"):
        extra = dict(sliding_window=16, query_pre_attn_scalar=16)
    if family == "mistral":
        extra = dict(sliding_window=None)
    return classes[family](**TINY, **extra)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]


def tiny_model(family: str, seed: int = 0, attn: str | None = None, **overrides):
    """A tiny random model of `family`; `overrides` change config values."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    # Gemma 2 has no sdpa path in transformers; it runs eager.
    config._attn_implementation = attn or ("eager" if family == "gemma2" else "sdpa")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init gives near-uniform logits; scale up so quantization error is visible in tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
            if "bias" in name:
                p.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def default_model():
    """The bundled SmolLM2-135M (converted once into the cache)."""
    import lowbit

    return lowbit.load_model()


@pytest.fixture(scope="session")
def wikitext_path():
    if not SHARED_DATA.is_file():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def _threads():
    # LOWBIT_TEST_THREADS=1 leaves a core to other work (a benchmark) running beside the tests
    torch.set_num_threads(int(os.environ.get("LOWBIT_TEST_THREADS", max(1, min(2, os.cpu_count() or 1)))))


SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A model reads text and predicts the next word. "
    "Quantization maps real numbers to a small set of integers, and the error it adds is measured. "
) * 40


def word_tokenizer(vocab_size: int = 512):
    """A small word-level fast tokenizer, built in code (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(SAMPLE_TEXT.replace(".", " .").replace(",", " ,").split()))
    vocab = {"[UNK]": 0, "[EOS]": 1}
    for w in words[: vocab_size - 2]:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A saved tiny Llama with its tokenizer, loadable by lowbit as a local folder."""
    model = tiny_model("llama")
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def sample_text_file(tmp_path):
    path = tmp_path / "sample.txt"
    path.write_text(SAMPLE_TEXT)
    return path


def run_cli(args, capsys):
    """`lowbit ARGS` in this process: (exit status, stdout, stderr)."""
    from lowbit.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def quantize_args(model_dir, text, *extra):
    """`lowbit quantize` on a local model with short windows (the tiny models' context is 256)."""
    return ["-q", "quantize", "--model", str(model_dir), "--data", str(text), "--seq-len", "32", "--windows", "3", *extra]


def is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, math.isqrt(q) + 1))


def old_paley(b: int) -> torch.Tensor:
    """lowbit's prime-field Paley I / II matrix of order b as written before prime-power fields
    (Q[i, j] = chi(j - i), chi from the squares mod q): what saved models without a recorded base
    order were quantized with."""
    q = b - 1 if b % 4 == 0 and is_prime(b - 1) else b // 2 - 1
    squares = {x * x % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)])
    idx = torch.arange(q)
    Q = chi[(idx[None, :] - idx[:, None]) % q]
    if q % 4 == 3:
        S = torch.zeros(b, b, dtype=torch.int64)
        S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, Q
        return S + torch.eye(b, dtype=torch.int64)
    C = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    C[0, 1:], C[1:, 0], C[1:, 1:] = 1, 1, Q
    plus, minus = torch.tensor([[1, 1], [1, -1]]), torch.tensor([[1, -1], [-1, -1]])
    return torch.kron(C, plus) + torch.kron(torch.eye(q + 1, dtype=torch.int64), minus)
