"""A bundle's inference config read as data, never run: literals, ``@`` references, the network.

MONAI builds a bundle by executing its config (``_target_`` calls, ``$`` Python expressions);
here a value is read only when it is a JSON literal or an ``@key`` reference to one, and the
network only when its ``_target_`` is a class of ``monai.networks.nets`` (or mtkd's
``ThesisUNet``); anything that would run code is refused with an MTKDError naming where.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from mtkd.errors import MTKDError
from mtkd.models.thesis_unet import ThesisUNet

CONFIGS = tuple(Path("configs") / f"inference{s}" for s in (".json", ".yaml", ".yml"))
THESIS_TARGET = "mtkd.models.thesis_unet.ThesisUNet"
_REFERENCE = re.compile(r"\$?@([A-Za-z_]\w*(?:(?:#|::)\w+)*)")
_ID_SEPARATOR = re.compile(r"::|#")
_SPECIAL_KEYS = {"_target_", "_desc_", "_mode_", "_disabled_", "_requires_"}


def read_mapping(path: Path) -> dict[str, Any]:
    """The object of a JSON or YAML file (YAML parsed as data only); MTKDError otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise MTKDError(f"unreadable ({error})", path) from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as error:  # noqa: BLE001 - any parse failure is the file's problem
        raise MTKDError(f"not valid {path.suffix[1:].upper()} ({error})", path) from None
    if not isinstance(data, dict):
        raise MTKDError("expected a JSON/YAML object at the top level", path)
    return data


def read_config(folder: Path) -> tuple[dict[str, Any], Path]:
    """The bundle's inference config (JSON or YAML, parsed as data only) and its path."""
    for relative in CONFIGS:
        if (folder / relative).is_file():
            return read_mapping(folder / relative), folder / relative
    raise MTKDError(
        "bundle config is missing (configs/inference.json or configs/inference.yaml)",
        folder / CONFIGS[0],
    )


def _runs_code(where: str, value: Any, path: Path) -> MTKDError:
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return MTKDError(
        f"{where} is {shown}: the bundle config would run code there, and mtkd does not "
        "execute bundle configs (only JSON literals and @references to literals are read)",
        path,
    )


def _lookup(config: dict[str, Any], reference: str, path: Path) -> Any:
    node: Any = config
    for part in _ID_SEPARATOR.split(reference):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise MTKDError(f"config reference '@{reference}' points to nothing", path)
    return node


def literal(
    value: Any, config: dict[str, Any], path: Path, where: str, seen: tuple[str, ...] = ()
) -> Any:
    """``value`` with its ``@key`` references replaced; MTKDError for anything that would run
    code (``$`` expressions, ``_target_`` objects, ``%`` macros)."""
    if isinstance(value, str):
        if value.startswith("$"):
            raise _runs_code(where, value, path)
        if value.startswith("%"):
            raise MTKDError(f"{where} is {value!r}: '%' macros are not supported", path)
        if value.startswith("@"):
            reference = value[1:]
            if reference in seen:
                raise MTKDError(f"{where}: config references loop through '@{reference}'", path)
            target = _lookup(config, reference, path)
            return literal(target, config, path, where, (*seen, reference))
        return value
    if isinstance(value, list):
        return [literal(v, config, path, f"{where}[{i}]", seen) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if "_target_" in value:
            raise _runs_code(where, {"_target_": value["_target_"]}, path)
        special = sorted(k for k in value if str(k) in _SPECIAL_KEYS)
        if special:
            raise _runs_code(where, {special[0]: value[special[0]]}, path)
        return {k: literal(v, config, path, f"{where}.{k}", seen) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float)):
        return value
    raise MTKDError(f"{where} holds a {type(value).__name__}, not a JSON value", path)


def follow_references(config: dict[str, Any], node: Any, name: str, path: Path) -> tuple[Any, str]:
    """Follow ``"@x"`` / ``"$@x..."`` by name only (nothing is evaluated)."""
    for _ in range(16):
        if not isinstance(node, str):
            return node, name
        match = _REFERENCE.match(node)
        if match is None:
            raise _runs_code(name, node, path)
        name = match.group(1)
        node = _lookup(config, name, path)
    raise MTKDError(f"config references starting at '{name}' do not end", path)


def network_class(target: Any, path: Path) -> type[nn.Module]:
    """The class a ``network_def`` ``_target_`` names: a ``monai.networks.nets`` class (short or
    dotted name) or mtkd's ThesisUNet; anything else is refused."""
    import monai.networks.nets as nets

    if target == THESIS_TARGET:
        return ThesisUNet
    if not isinstance(target, str):
        raise _runs_code("network_def._target_", target, path)
    name = target.rsplit(".", 1)[-1]
    found = getattr(nets, name, None)
    if not (inspect.isclass(found) and issubclass(found, nn.Module)):
        found = None
    allowed = {name, f"monai.networks.nets.{name}"}
    if found is not None:
        allowed.add(f"{found.__module__}.{name}")
    if found is None or target not in allowed:
        raise MTKDError(
            f"network_def._target_ is {target!r}, not a class of monai.networks.nets: the bundle "
            "config would run code there, and mtkd does not execute bundle configs",
            path,
        )
    return found


def network_definition(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """The network's definition ``{"_target_": ..., **arguments}`` with literal arguments only."""
    if "network_def" in config:
        node, name = follow_references(config, config["network_def"], "network_def", path)
    elif "network" in config:
        node, name = follow_references(config, config["network"], "network", path)
    else:
        raise MTKDError("bundle config has no network_def", path)
    if not isinstance(node, dict) or "_target_" not in node:
        raise MTKDError(f"{name} is not a network definition (a dict with _target_)", path)
    if node.get("_mode_", "default") != "default" or node.get("_disabled_") or "_requires_" in node:
        raise _runs_code(name, {k: node[k] for k in node if k in _SPECIAL_KEYS - {"_desc_"}}, path)
    cls = network_class(node["_target_"], path)
    arguments = {}
    for key, value in node.items():
        if key in _SPECIAL_KEYS:
            continue
        value = literal(value, config, path, f"{name}.{key}")
        if (value and "pretrained" in str(key).lower()) or any(
            "://" in text for text in _strings(value)
        ):
            raise MTKDError(
                f"{name}.{key} = {value!r}: mtkd does not fetch or read other weights while "
                "building a bundle's network",
                path,
            )
        arguments[key] = value
    target = THESIS_TARGET if cls is ThesisUNet else node["_target_"]
    return {"_target_": target, **arguments}


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def build_network_def(definition: dict[str, Any], path: Path) -> nn.Module:
    """Instantiate a checked :func:`network_definition` (no config code runs)."""
    cls = network_class(definition["_target_"], path)
    arguments = {k: v for k, v in definition.items() if k != "_target_"}
    try:
        return cls(**arguments)
    except Exception as error:  # noqa: BLE001 - any constructor failure is the bundle's
        raise MTKDError(
            f"cannot build {cls.__name__} from network_def ({type(error).__name__}: {error})", path
        ) from None
