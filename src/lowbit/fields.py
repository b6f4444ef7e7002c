"""Typed settings from untyped input: a config dataclass built from a mapping (a recipe file, CLI
options), each value checked against the field's type, so that `fuse_r1: "false"` or
`damp: abc` is a clear error instead of a wrong run or a traceback."""

from __future__ import annotations

import dataclasses
import types
import typing
from functools import cache

from .errors import UserError


@cache
def field_types(cls: type) -> dict[str, object]:
    """The type of each init field of dataclass `cls` (string annotations resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _type_name(kind) -> str:
    args = typing.get_args(kind)
    if args:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(kind, getattr(kind, "__name__", str(kind)))


def check_value(kind, value, what: str):
    """`value` as field type `kind` (an int is accepted for a float), or a UserError naming `what`."""
    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
        if option not in (type(None), bool, int, float, str) and isinstance(option, type) and isinstance(value, option):
            return value
    raise UserError(f"{what} must be {_type_name(kind)}; got {value!r}")


def dataclass_from_dict(cls: type, data: dict, where: str):
    """An instance of dataclass `cls` from `data`; unknown keys and values of the wrong type are refused."""
    types_ = field_types(cls)
    unknown = set(data) - set(types_)
    if unknown:
        known = ", ".join(sorted(types_)) or "none"
        raise UserError(f"{where}: unknown settings {', '.join(sorted(unknown))} (known: {known})")
    return cls(**{k: check_value(types_[k], v, f"{where}: {k}") for k, v in data.items()})
