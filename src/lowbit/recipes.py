"""Recipes: a named or saved (YAML) combination of scheme, transform and algorithm."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .algorithms import ALGORITHMS
from .errors import UserError
from .scheme import Scheme, parse_scheme

TRANSFORMS = ("none",)


@dataclass(frozen=True)
class Recipe:
    scheme: Scheme
    transform: str = "none"
    algorithm: str = "rtn"

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise UserError(f"unknown transform {self.transform!r}; available: {', '.join(TRANSFORMS)}")
        if self.algorithm not in ALGORITHMS:
            raise UserError(f"unknown algorithm {self.algorithm!r}; available: {', '.join(ALGORITHMS)}")


NAMED: dict[str, dict] = {
    "w8a8kv8-rtn": {"scheme": "W8A8KV8"},
    "w8a8-rtn": {"scheme": "W8A8"},
    "w4a16-rtn": {"scheme": "W4A16"},
    "w4g64a16-rtn": {"scheme": "W4g64A16"},
    "w4a8kv4-rtn": {"scheme": "W4A8KV4"},
    "w4a4kv4-rtn": {"scheme": "W4A4KV4"},
}


def load_recipe(name_or_file: str) -> Recipe:
    if name_or_file in NAMED:
        return _from_dict(NAMED[name_or_file], name_or_file)
    path = Path(name_or_file)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UserError(f"recipe file not found: {path}")
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise UserError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise UserError(f"{path} must hold a mapping with keys scheme, transform, algorithm")
        return _from_dict(data, str(path))
    raise UserError(f"unknown recipe {name_or_file!r}; named recipes: {', '.join(NAMED)}, or a .yaml file")


def _from_dict(data: dict, where: str) -> Recipe:
    unknown = set(data) - {"scheme", "transform", "algorithm"}
    if unknown:
        raise UserError(f"recipe {where}: unknown keys {', '.join(sorted(unknown))} (expected scheme, transform, algorithm)")
    if "scheme" not in data:
        raise UserError(f"recipe {where}: missing 'scheme'")
    return Recipe(
        scheme=parse_scheme(str(data["scheme"])),
        transform=str(data.get("transform", "none")),
        algorithm=str(data.get("algorithm", "rtn")),
    )
