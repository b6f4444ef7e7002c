"""lowbit's own saved format: a quantized model that reloads with identical logits.

A saved model is a folder:

    lowbit.json        format name and version, the transformers config, the quantization
                       state (scheme, transform, algorithm and its config), every module lowbit
                       swapped in (quantized linears with their weight / input quantizers and
                       online rotations, KV quantizers and query-key rotations of each
                       attention), and a sha256 of every other file
    model.safetensors  the model's state dict: quantized weights as their `QuantizedWeight`
                       tensors (`<name>.weight_codes`, packed uint8; `<name>.weight_scale` and,
                       asymmetric only, `<name>.weight_zero` in the scale format), every other
                       tensor (embeddings, norms, biases, static quantizer ranges, random rotation
                       signs) as it is in the model
    tokenizer files    when a tokenizer was given

Saving writes the codes and scales the model holds, so a reload computes bit for bit the same.
Loading rebuilds the stock transformers model from the config (no download, no modeling code of
ours), swaps the same lowbit modules in at the same paths, and loads the tensors strictly. The
folder is written under a temporary name and renamed into place.

Format version 3 added floating-point formats: codes that are FP8 / FP4 bit patterns, scales in
E8M0 or E4M3 (`F8_E8M0`, `F8_E4M3`), NVFP4's `<name>.weight_global_scale`, a `global_scale` key in
every quantizer's settings and block-diagonal rotations (`block`). Version 2 (integer formats
only) and version 1 (lowbit 0.1 before the quantized weight became a value, which stored the same
codes as `<name>.weight.codes` with float32 `.scale` / `.zero`) still load.

Format version 4 added mixture-of-experts models: `modules.experts` lists every `QuantExperts`
(per-expert linears in place of the stock fused experts) by path with its sizes; the loader swaps
one in at that path of the stock model before the per-expert quantized linears go in. A model
without experts is still written as version 3, which older lowbit reads.

Format version 5 added two things, and a model holding either is written as version 5 (one
without is written as before, which older lowbit reads):
- full-precision prefix tokens (a scheme with ``P<N>``): the scheme's `fp_prefix`, which every
  input and KV quantizer takes on loading (and the loaded model's forward hooks that tell linears
  where incremental decoding stands); an older lowbit refuses it instead of quantizing the prefix;
- the Hadamard matrix of every online rotation: `base`, the base order b of H = H_{2^k} (x) H_b
  (of each block's H with `block`). Which base lowbit picks for an order changed when Hadamard
  constructions past prime-field Paley were added (104 was Paley I of order 104, now 2 x 52), so
  the size alone no longer says which matrix the model was quantized with. An entry without
  `base` (versions 1-4) rotates with `hadamard.legacy_base`, the choice of the lowbit that wrote it.

Format version 6 added dense online rotations (a learned R1, `OnlineRotation`): the entry
`{"size": n, "dense": true}`, its matrix stored in the weights file as `<path>.input_rotation.matrix`
(once, when several linears share it). A model without one is written as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..arch import expert_dims, get_arch, get_module, set_module
from ..errors import UserError
from ..files import write_dir_atomically
from ..hadamard import legacy_base
from ..quant.qweight import QuantizedWeight
from ..runtime.experts import ExpertMLP, QuantExperts
from ..runtime.kv import (
    KEY_QUANT,
    PREFIX,
    QK_ROTATION,
    VALUE_QUANT,
    register_attention,
    set_attention_implementation,
)
from ..runtime.linear import CODES, GLOBAL_SCALE, SCALE, ZERO, QuantLinear
from ..runtime.prefix import install_prefix_hooks
from ..runtime.quantizer import TensorQuantizer
from ..runtime.rotation import OnlineHadamard, OnlineRotation
from ..runtime.state import QuantizationState, require_state, set_quantization_state
from ..scheme import Scheme, args_from_dict, args_to_dict
from ..version import __version__
from .description import CHECKSUM_KEY, check_description, description_checksum
from .tensorfile import SafetensorsSpill, write_safetensors

log = logging.getLogger("lowbit")

FORMAT = "lowbit-quantized"
FORMAT_VERSION = 6  # the newest version this lowbit reads and writes
DENSE_ROTATION_VERSION = 6  # a dense (learned) online rotation
ROTATION_BASE_VERSION = 5  # rotation entries record their base order from this version on
PREFIX_FORMAT_VERSION = 5  # a scheme with full-precision prefix tokens (P<N>)
EXPERTS_FORMAT_VERSION = 4  # what a model with experts (and neither of the above) is written as
DENSE_FORMAT_VERSION = 3  # what a model without experts, prefix or online rotations is written as
CONFIG_FILE = "lowbit.json"
WEIGHTS_FILE = "model.safetensors"
RUN_SUBDIR = "model"  # where a run folder (`lowbit quantize --out DIR`) keeps the saved model
LOWBIT_MODULES = (QuantLinear, TensorQuantizer, OnlineHadamard, OnlineRotation, QuantExperts, ExpertMLP)


def is_saved_model(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def saved_model_dir(path: str | Path) -> Path | None:
    """The saved model in `path`: the folder itself, or the `model/` folder of a run folder."""
    path = Path(path)
    for candidate in (path, path / RUN_SUBDIR):
        if is_saved_model(candidate):
            return candidate
    return None


# ---------------------------------------------------------------- save


def _rotation_entry(rotation: nn.Module | None, owners: dict[int, str], path: str) -> dict | None:
    """Size, base order and sign flag of an online rotation; a rotation shared by several linears
    (q/k/v after GPTQ/AWQ) is recorded once and referred to by the path of its first owner."""
    if rotation is None:
        return None
    if id(rotation) in owners:
        return {"same_as": owners[id(rotation)]}
    owners[id(rotation)] = path
    if isinstance(rotation, OnlineRotation):  # its matrix is a tensor of the weights file
        return {"size": rotation.size, "dense": True}
    entry = {"size": rotation.size, "base": rotation.base, "random_signs": rotation.signs is not None}
    if rotation.block is not None:
        entry["block"] = rotation.block
    return entry


def _check_savable(model: nn.Module) -> None:
    """Every module is a stock transformers module or one lowbit knows how to rebuild."""
    for name, module in model.named_modules():
        cls = type(module)
        if isinstance(module, LOWBIT_MODULES):
            if cls not in LOWBIT_MODULES:
                raise UserError(f"cannot save {name}: {cls.__name__} is not a module the lowbit format {FORMAT_VERSION} describes")
            if isinstance(module, TensorQuantizer) and (module.observing or not module.calibrated):
                raise UserError(f"cannot save {name}: its static quantizer is not calibrated (run lowbit.calibrate_static first)")
            if isinstance(module, QuantLinear) and module.trainable:
                raise UserError(f"cannot save {name}: it still trains a latent weight; call lowbit.qat.freeze_student(model) first")
        elif not cls.__module__.startswith(("transformers.", "torch.nn")):
            raise UserError(f"cannot save {name or 'the model'}: {cls.__module__}.{cls.__name__} is neither a transformers nor a lowbit module")


def describe_modules(model: nn.Module) -> dict:
    """The lowbit modules of `model` by path, enough to swap them into a fresh stock model."""
    linears, attention, experts, owners = {}, {}, {}, {}
    for name, module in model.named_modules():
        if isinstance(module, QuantExperts):
            n, hidden, inner = module.dims
            experts[name] = {"num_experts": n, "hidden_size": hidden, "inner_size": inner}
        if isinstance(module, QuantLinear):
            linears[name] = {
                "in_features": module.in_features,
                "out_features": module.out_features,
                "bias": module.bias is not None,
                "weight": args_to_dict(module.weight_args),
                "input": args_to_dict(module.input_quant.args) if module.input_quant is not None else None,
                "input_rotation": _rotation_entry(module.input_rotation, owners, name),
            }
        extras = {attr: getattr(module, attr, None) for attr in (KEY_QUANT, VALUE_QUANT, QK_ROTATION)}
        if any(v is not None for v in extras.values()):
            attention[name] = {
                "key": args_to_dict(extras[KEY_QUANT].args) if extras[KEY_QUANT] is not None else None,
                "value": args_to_dict(extras[VALUE_QUANT].args) if extras[VALUE_QUANT] is not None else None,
                "qk_rotation": _rotation_entry(extras[QK_ROTATION], owners, name),
            }
    return {"linears": linears, "attention": attention, **({"experts": experts} if experts else {})}


def _state_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict to store (quantized weights are codes and scales already), and aliases of
    tied tensors (stored once)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_by_storage: dict[tuple, str] = {}
    for key, value in model.state_dict().items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.dtype)
        if value.numel() and ident in first_by_storage:
            aliases[key] = first_by_storage[ident]
            continue
        first_by_storage[ident] = key
        tensors[key] = value.detach().contiguous()
    return tensors, aliases


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _hf_config(model: nn.Module) -> dict:
    config = model.config.to_dict()
    return {k: v for k, v in config.items() if not k.startswith("_attn_implementation")}


def save_quantized(model: nn.Module, out: str | Path, tokenizer=None, *, overwrite: bool = False) -> Path:
    """Save a lowbit-quantized model (and its tokenizer) to folder `out`; returns `out`.

    The model is not modified. `out` appears complete or not at all."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; pass overwrite=True (--overwrite) or choose another folder")
    get_arch(model)
    require_state(model, "save")
    _check_savable(model)
    version = saved_format_version(model)

    def fill(tmp: Path) -> None:
        tensors, aliases = _state_tensors(model)
        metadata = {"format": FORMAT, "format_version": str(version)}
        digest, size = write_safetensors(tmp / WEIGHTS_FILE, tensors, metadata)  # hashed as it is written
        del tensors
        write_description(tmp, model, {"sha256": digest, "bytes": size}, aliases, tokenizer)

    write_dir_atomically(out, fill, overwrite=overwrite)
    log.info("saved quantized model (%s) to %s", require_state(model, "save").scheme.name, out)
    return out


def saved_format_version(model: nn.Module) -> int:
    """The oldest format version that describes `model`, so older lowbit reads what it can: 6 with
    a dense online rotation, 5 with full-precision prefix tokens or an online rotation (its base
    order), 4 with experts, else 3."""
    modules = describe_modules(model)
    rotations = [e["input_rotation"] for e in modules["linears"].values()] + [e["qk_rotation"] for e in modules["attention"].values()]
    if any(r is not None and r.get("dense") for r in rotations):
        return DENSE_ROTATION_VERSION
    if require_state(model, "save").scheme.fp_prefix:
        return PREFIX_FORMAT_VERSION
    if any(r is not None for r in rotations):
        return ROTATION_BASE_VERSION
    return EXPERTS_FORMAT_VERSION if "experts" in modules else DENSE_FORMAT_VERSION


def finish_weights(tmp: Path, spill: SafetensorsSpill, model: nn.Module) -> dict:
    """Write the weights file of a saved model from tensors spilled one layer at a time (the
    sequential onloading pipeline); its entry for `write_description`."""
    digest, size = spill.finish(tmp / WEIGHTS_FILE, {"format": FORMAT, "format_version": str(saved_format_version(model))})
    return {"sha256": digest, "bytes": size}


def write_description(tmp: Path, model: nn.Module, weights: dict, aliases: dict[str, str], tokenizer=None) -> None:
    """The tokenizer and `lowbit.json` of a saved model in folder `tmp`, whose weights file is
    written already (`weights`: its sha256 and size). Reads only the model's structure and settings,
    so the model's tensors may be on the meta device by now."""
    spec = get_arch(model)
    state = require_state(model, "save")
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    files = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir()) if p.is_file() and p.name != WEIGHTS_FILE}
    files[WEIGHTS_FILE] = weights
    modules = describe_modules(model)
    config = {
        "format": FORMAT,
        "format_version": saved_format_version(model),
        "lowbit_version": __version__,
        "family": spec.family,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "attn_implementation": (model.config._attn_implementation or "eager").removeprefix(PREFIX),
        "hf_config": _hf_config(model),
        **state.to_dict(),
        "source": state.source or getattr(model, "lowbit_source", None),
        "modules": modules,
        "aliases": aliases,
        "files": files,
    }
    config[CHECKSUM_KEY] = description_checksum(config)
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


# ---------------------------------------------------------------- load


def read_config(path: str | Path) -> dict:
    """`lowbit.json` of a saved model, with its format checked and every listed file verified."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise UserError(f"{path} is not a lowbit saved model (no {CONFIG_FILE}); save one with lowbit quantize --out DIR")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{config_file} is corrupted ({exc}); save the model again") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserError(f"{config_file} is not a lowbit saved-model config (format is not {FORMAT!r})")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise UserError(f"{config_file} has no valid format_version; the file is corrupted, save the model again")
    if version > FORMAT_VERSION:
        raise UserError(
            f"{path} was saved by lowbit {config.get('lowbit_version', '?')} in format version {version}; this lowbit "
            f"({__version__}) reads format versions up to {FORMAT_VERSION}: upgrade lowbit"
        )
    required = ("hf_config", "scheme", "modules", "files", "aliases", "dtype") + (("quantized_weights",) if version == 1 else ())
    missing_keys = [k for k in required if k not in config]
    if missing_keys:
        raise UserError(f"{config_file} is incomplete (no {', '.join(missing_keys)}); save the model again")
    check_description(config, str(config_file))  # every field, names confined to the folder, the checksum
    if WEIGHTS_FILE not in config["files"]:
        raise UserError(f"{config_file} lists no {WEIGHTS_FILE}; save the model again")
    for name, meta in config["files"].items():
        file = path / name
        if not file.is_file():
            raise UserError(f"{path} is incomplete: {name} is missing; copy the whole folder or save the model again")
        if file.stat().st_size != meta.get("bytes") or _sha256(file) != meta.get("sha256"):
            raise UserError(f"{file} is corrupted (its checksum does not match {CONFIG_FILE}); copy or save the model again")
    return config


def _rotation(entry: dict | None, built: dict[str, nn.Module], path: str) -> nn.Module | None:
    if entry is None:
        return None
    if "same_as" in entry:
        if entry["same_as"] not in built:
            raise UserError(f"saved model config is damaged: {path} shares the rotation of unknown {entry['same_as']}")
        return built[entry["same_as"]]
    if entry.get("dense"):
        built[path] = OnlineRotation(torch.empty(entry["size"], entry["size"]))  # its matrix is loaded from the file
        return built[path]
    signs = torch.ones(entry["size"]) if entry["random_signs"] else None  # loaded from the file
    block = entry.get("block")
    try:
        # before version 5 the base was not recorded: the writer's lowbit chose it by the legacy rule
        base = entry["base"] if "base" in entry else legacy_base(block or entry["size"])
        built[path] = OnlineHadamard(entry["size"], signs, block, base)
    except UserError as exc:  # a size, block or base order no Hadamard matrix fits: an edit, not a lowbit save
        raise UserError(f"saved model config is damaged: the rotation of {path}: {exc}") from None
    return built[path]


def _build_model(config: dict) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    hf = dict(config["hf_config"])
    model_type = hf.pop("model_type", None)
    try:
        hf_config = AutoConfig.for_model(model_type, **hf)
    except (ValueError, KeyError) as exc:
        raise UserError(f"cannot rebuild the model: transformers does not know model_type {model_type!r} ({exc})") from None
    dtype = getattr(torch, config["dtype"])
    with no_init_weights():  # every tensor is loaded from the file
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation=config.get("attn_implementation") or "eager")
    model.tie_weights()  # no_init_weights skips tying; a tied lm_head must share the embedding again
    return model.eval()


def _swap_modules(model: nn.Module, modules: dict, stored: dict[str, torch.Tensor], dtype: torch.dtype, fp_prefix: int = 0) -> None:
    """Swap the saved lowbit modules in; quantized linears take their codes and scales from `stored`;
    input and KV quantizers keep the scheme's first `fp_prefix` tokens in full precision."""
    rotations: dict[str, nn.Module] = {}
    if modules.get("experts"):  # first: the per-expert linears below live inside these
        moe = get_arch(model).moe
        if moe is None:
            raise UserError(f"saved model does not match its config: {model.config.model_type} has no experts; save the model again")
        for path, entry in modules["experts"].items():
            stock = _module_at(model, path)
            try:
                dims = expert_dims(stock, moe, path)
            except UserError:
                dims = None
            if dims != (entry["num_experts"], entry["hidden_size"], entry["inner_size"]):
                raise UserError(f"saved model does not match its config: {path} is not the experts module it describes; save the model again")
            set_module(model, path, QuantExperts.from_stock(stock, moe, copy_weights=False))
    for path, entry in modules["linears"].items():
        old = _module_at(model, path)
        shape = (entry["out_features"], entry["in_features"])
        if not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != shape:
            raise UserError(f"saved model does not match its config: {path} is not a {shape[0]}x{shape[1]} linear")
        bias = torch.empty(entry["out_features"], dtype=dtype) if entry["bias"] else None
        w_args = args_from_dict(entry["weight"])
        if w_args is None:
            weight = torch.empty(shape, dtype=dtype)
        else:
            try:
                weight = QuantizedWeight.from_packed(
                    stored[f"{path}.{CODES}"],
                    stored[f"{path}.{SCALE}"],
                    stored.get(f"{path}.{ZERO}"),
                    shape,
                    w_args,
                    stored.get(f"{path}.{GLOBAL_SCALE}"),
                )
            except (KeyError, ValueError, RuntimeError) as exc:
                raise UserError(f"quantized weight {path} is damaged ({exc}); save the model again") from None
        rotation = _rotation(entry["input_rotation"], rotations, path)
        new = QuantLinear(weight, bias, None, args_from_dict(entry["input"]), rotation, fp_prefix=fp_prefix)
        set_module(model, path, new)
    if modules["attention"]:
        for path, entry in modules["attention"].items():
            attention = _module_at(model, path)
            for attr, key in ((KEY_QUANT, "key"), (VALUE_QUANT, "value")):
                if entry[key] is not None:
                    setattr(attention, attr, TensorQuantizer(args_from_dict(entry[key]), fp_prefix))
            if entry["qk_rotation"] is not None:
                setattr(attention, QK_ROTATION, _rotation(entry["qk_rotation"], rotations, path))
        set_attention_implementation(model, register_attention(model.config._attn_implementation or "eager"))


def _module_at(model: nn.Module, path: str) -> nn.Module:
    try:
        return get_module(model, path)
    except AttributeError:
        raise UserError(f"saved model does not match its config: {type(model).__name__} has no module {path}; save the model again") from None


def _read_tensors(path: Path, config: dict) -> dict[str, torch.Tensor]:
    """The stored state dict, tied tensors restored; version-1 names of codes and scales renamed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        stored = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path / WEIGHTS_FILE} cannot be read ({exc}); save the model again") from None
    if config["format_version"] == 1:  # <name>.weight.codes / .scale / .zero -> <name>.weight_codes / ...
        for key in config["quantized_weights"]:
            owner = key.rpartition(".")[0]
            for old, new in (("codes", CODES), ("scale", SCALE), ("zero", ZERO)):
                if f"{key}.{old}" in stored:
                    stored[f"{owner}.{new}"] = stored.pop(f"{key}.{old}")
    for alias, target in config["aliases"].items():
        if target not in stored:
            raise UserError(f"{path / WEIGHTS_FILE} has no {target} (needed by {alias}); save the model again")
        stored[alias] = stored[target]
    return stored


def load_quantized(path: str | Path, *, device: str | None = None):
    """Load a model saved by `save_quantized` (or `lowbit quantize --out`): (model, tokenizer or None).

    `path` may be the saved model folder or a run folder holding it in `model/`."""
    given = Path(path)
    found = saved_model_dir(given)
    if found is None:
        if given.is_dir() and (given / "report.json").is_file():
            raise UserError(
                f"{given} is a lowbit run folder without a saved model (quantized with --no-save-model, or by an older lowbit); "
                "quantize again with --out to save the model"
            )
        raise UserError(f"{given} is not a lowbit saved model (no {CONFIG_FILE} in it or in {given / RUN_SUBDIR})")
    config = read_config(found)
    log.info("loading quantized model from %s", found)
    model = _build_model(config)
    dtype = getattr(torch, config["dtype"])
    state = _read_tensors(found, config)
    scheme = Scheme.from_dict(config["scheme"])
    _swap_modules(model, config["modules"], state, dtype, scheme.fp_prefix)
    if scheme.fp_prefix:  # linears learn where each forward's tokens start (incremental decoding)
        install_prefix_hooks(model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        raise UserError(f"{found / WEIGHTS_FILE} does not match its config ({' '.join(first[:2])[:300]}); save the model again") from None
    if device:
        model.to(device)
    set_quantization_state(
        model,
        QuantizationState(
            scheme=scheme,
            transform=config.get("transform") or {"kind": "none"},
            algorithm=config.get("algorithm", "unknown"),  # format version 1 did not record it
            algorithm_config=config.get("algorithm_config", {}),
            source=str(found),
        ),
    )
    tokenizer = None
    if (found / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(found)
    return model, tokenizer
