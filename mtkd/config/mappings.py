"""Typed dataclasses from plain mappings (as YAML gives them): every key known, every value of
its field's type (recursively), no NaN or infinity; errors name the dotted key and the file.
And where two nested mappings differ, key by key."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

from mtkd.errors import MTKDError, one_line

__all__ = ["build_dataclass", "differing_keys", "key_name"]


def build_dataclass(cls: type, data: Any, prefix: str, source: str | Path | None) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, checking keys and types recursively."""
    if not isinstance(data, dict):
        raise MTKDError(f"config key '{prefix.rstrip('.') or '<root>'}' must be a mapping", source)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    where = f" in '{prefix.rstrip('.')}'" if prefix else ""
    _check_names(data, where, source)
    unknown = sorted(set(data) - known)
    if unknown:
        raise MTKDError(
            f"unknown config key(s) {', '.join(map(key_name, unknown))}{where}; known: "
            f"{', '.join(sorted(known))}",
            path=source,
        )
    values = {
        name: _coerce(hints[name], value, f"{prefix}{name}", source) for name, value in data.items()
    }
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str, source: str | Path | None) -> Any:
    """``value`` of config key ``key`` as the type ``hint`` (dataclasses built recursively)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        return _coerce(options[0], value, key, source)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, f"{key}.", source)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise MTKDError(f"config key '{key}' is {value!r}; choose one of {choices}", source)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise MTKDError(f"config key '{key}' must be a list", path=source)
        return [_coerce(args[0], item, f"{key}[{i}]", source) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise MTKDError(f"config key '{key}' must be a mapping", path=source)
        _check_names(value, f" in '{key}'", source)
        return {
            name: _coerce(args[1], item, f"{key}.{key_name(name)}", source)
            for name, item in value.items()
        }
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise MTKDError(f"config key '{key}' must be a finite number, got {value!r}", source)
        return number
    if hint is Any:
        _check_finite(value, key, source)
        return value
    if isinstance(hint, type) and isinstance(value, hint):
        if hint is int and isinstance(value, bool):
            raise MTKDError(f"config key '{key}' must be an integer", path=source)
        return value
    name = getattr(hint, "__name__", str(hint))
    raise MTKDError(f"config key '{key}' must be {name}, got {_shown(value)}", path=source)


def _check_finite(value: Any, key: str, source: str | Path | None) -> None:
    """MTKDError naming the key of a NaN or infinity anywhere in a free-form value (network
    parameters): no setting of ours takes one."""
    if isinstance(value, float) and not math.isfinite(value):
        raise MTKDError(f"config key '{key}' must be a finite number, got {value!r}", source)
    if isinstance(value, dict):
        for name, item in value.items():
            _check_finite(item, f"{key}.{key_name(name)}", source)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_finite(item, f"{key}[{index}]", source)


def _check_names(data: dict, where: str, source: str | Path | None) -> None:
    """MTKDError when a key of the mapping ``data`` is not text (YAML allows ``1:``, ``[a]:``)."""
    for name in data:
        if not isinstance(name, str):
            raise MTKDError(f"config key {_shown(name)}{where} must be a name (text)", source)


def key_name(name: Any) -> str:
    """A key for messages: as written when it is plain text, else quoted with escapes."""
    plain = isinstance(name, str) and name.isprintable() and name.strip() == name
    plain = plain and 0 < len(name) <= 60
    return name if plain else _shown(name, 60)


def _shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for one-line messages."""
    text = one_line(repr(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def differing_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys (``train.epochs``) in which two nested mappings differ, sorted."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in sorted(set(a) | set(b), key=str):
            found += differing_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        return found
    return [] if a == b else [prefix.rstrip(".")]
