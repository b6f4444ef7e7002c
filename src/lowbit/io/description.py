"""The description of a saved model (`lowbit.json`): its checksum and a strict check of every field.

The description says which modules to build and which files to read, so it is checked before
anything is built or opened: every key known, every value of its type, module paths made of
identifiers, file names confined to the folder, a checksum over the whole description so that a
hand edit (a scheme changed, a quantizer added) is refused instead of silently computing something
other than what the report says.
"""

from __future__ import annotations

import hashlib
import json
import re

from ..errors import UserError
from ..scheme import Scheme, args_from_dict

CHECKSUM_KEY = "description_sha256"
DTYPES = ("float32", "float16", "bfloat16", "float64")
_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_HEX = re.compile(r"[0-9a-f]{64}")
TOP_KEYS = {
    "format",
    "format_version",
    "lowbit_version",
    "family",
    "dtype",
    "attn_implementation",
    "hf_config",
    "scheme",
    "transform",
    "algorithm",
    "algorithm_config",
    "source",
    "modules",
    "aliases",
    "files",
    "quantized_weights",
    CHECKSUM_KEY,
}
LINEAR_KEYS = {"in_features", "out_features", "bias", "weight", "input", "input_rotation"}
ATTENTION_KEYS = {"key", "value", "qk_rotation"}
EXPERTS_KEYS = {"num_experts", "hidden_size", "inner_size"}


def description_checksum(config: dict) -> str:
    """sha256 of the description without its checksum, in a canonical JSON form."""
    body = {k: v for k, v in config.items() if k != CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_description(config: dict, where: str) -> None:
    """Every field of a (version 1 to 5) description, or a UserError that names the first bad one."""

    def bad(what: str) -> UserError:
        return UserError(f"{where} is damaged or was edited: {what}; save the model again")

    unknown = set(config) - TOP_KEYS
    if unknown:
        raise bad(f"unknown fields {', '.join(sorted(unknown))}")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise bad("format_version is not a version number")
    if version >= 2:
        if config.get(CHECKSUM_KEY) != description_checksum(config):
            raise bad("its checksum does not match its content")
    for key in ("lowbit_version", "family", "attn_implementation"):
        if key in config and not isinstance(config[key], str):
            raise bad(f"{key} is not a string")
    if config["dtype"] not in DTYPES:
        raise bad(f"dtype {config['dtype']!r} is not one of {', '.join(DTYPES)}")
    if not isinstance(config["hf_config"], dict) or not isinstance(config["hf_config"].get("model_type"), str):
        raise bad("hf_config has no model_type")
    for key in ("transform", "algorithm_config"):
        if key in config and not isinstance(config[key], dict):
            raise bad(f"{key} is not a mapping")
    if "algorithm" in config and not isinstance(config["algorithm"], str):
        raise bad("algorithm is not a string")
    if config.get("source") is not None and not isinstance(config["source"], str):
        raise bad("source is not a string")
    if not isinstance(config["scheme"], dict):
        raise bad("scheme is not a mapping")
    if Scheme.from_dict(config["scheme"]).fp_prefix and version < 5:  # every QuantArgs field checked (UserError)
        raise bad("a full-precision prefix (scheme fp_prefix) needs format version 5")
    _check_modules(config["modules"], bad, version)
    if "experts" in config["modules"] and version < 4:
        raise bad("modules.experts needs format version 4")
    aliases = config["aliases"]
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise bad("aliases is not a mapping of tensor names")
    for name in (*aliases, *aliases.values()):
        if not _PATH.fullmatch(name):
            raise bad(f"tensor name {name!r}")
    files = config["files"]
    if not isinstance(files, dict) or not files:
        raise bad("files lists nothing")
    for name, meta in files.items():
        if not isinstance(name, str) or not _FILE.fullmatch(name) or name in (".", ".."):
            raise bad(f"file name {name!r} is not a plain name inside the folder")
        if not isinstance(meta, dict) or set(meta) != {"sha256", "bytes"}:
            raise bad(f"files entry of {name}")
        if not isinstance(meta["sha256"], str) or not _HEX.fullmatch(meta["sha256"]):
            raise bad(f"the checksum of {name}")
        if not isinstance(meta["bytes"], int) or isinstance(meta["bytes"], bool) or meta["bytes"] < 0:
            raise bad(f"the size of {name}")
    if version == 1:
        quantized = config.get("quantized_weights")
        if not isinstance(quantized, list) or not all(isinstance(n, str) and _PATH.fullmatch(n) for n in quantized):
            raise bad("quantized_weights")


def _check_modules(modules, bad, version: int) -> None:
    if not isinstance(modules, dict) or set(modules) - {"experts"} != {"linears", "attention"}:
        raise bad("modules must hold linears and attention (and, for a mixture of experts, experts)")
    experts = modules.get("experts", {})
    if not isinstance(experts, dict):
        raise bad("modules.experts is not a mapping")
    for path, entry in experts.items():
        if not _PATH.fullmatch(path) or not isinstance(entry, dict) or set(entry) != EXPERTS_KEYS:
            raise bad(f"the experts entry of {path}")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in entry.values()):
            raise bad(f"the sizes of experts {path}")
    for group in ("linears", "attention"):
        if not isinstance(modules[group], dict):
            raise bad(f"modules.{group} is not a mapping")
    seen_rotations: set[str] = set()
    for path, entry in modules["linears"].items():
        if not _PATH.fullmatch(path):
            raise bad(f"module path {path!r}")
        if not isinstance(entry, dict) or set(entry) != LINEAR_KEYS:
            raise bad(f"the entry of {path}")
        for key in ("in_features", "out_features"):
            if not isinstance(entry[key], int) or isinstance(entry[key], bool) or entry[key] < 1:
                raise bad(f"{path}.{key}")
        if not isinstance(entry["bias"], bool):
            raise bad(f"{path}.bias")
        args_from_dict(entry["weight"])
        args_from_dict(entry["input"])
        _check_rotation(entry["input_rotation"], path, seen_rotations, bad, version)
        seen_rotations.add(path)
    for path, entry in modules["attention"].items():
        if not _PATH.fullmatch(path):
            raise bad(f"module path {path!r}")
        if not isinstance(entry, dict) or set(entry) != ATTENTION_KEYS:
            raise bad(f"the entry of {path}")
        args_from_dict(entry["key"])
        args_from_dict(entry["value"])
        _check_rotation(entry["qk_rotation"], path, seen_rotations, bad, version)
        seen_rotations.add(path)


def _check_rotation(entry, path: str, seen: set[str], bad, version: int) -> None:
    if entry is None:
        return
    if not isinstance(entry, dict):
        raise bad(f"the rotation of {path}")
    if set(entry) == {"same_as"}:
        if not isinstance(entry["same_as"], str) or entry["same_as"] not in seen:
            raise bad(f"{path} shares the rotation of unknown {entry['same_as']!r}")
        return
    if "dense" in entry:  # version 6: a dense (learned) rotation, its matrix in the weights file
        if version < 6 or set(entry) != {"size", "dense"} or entry["dense"] is not True:
            raise bad(f"the rotation of {path}")
        if not isinstance(entry["size"], int) or isinstance(entry["size"], bool) or entry["size"] < 1:
            raise bad(f"the rotation size of {path}")
        return
    # version 5 records the base order of H (a writer always does); older versions never did, and
    # their reader rotates with the base the legacy rule picks
    required = {"size", "random_signs"} | ({"base"} if version >= 5 else set())
    if set(entry) - {"block"} != required or not isinstance(entry["random_signs"], bool):
        raise bad(f"the rotation of {path}")
    for key in ("size", "block", "base"):
        value = entry.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise bad(f"the rotation {key} of {path}")
