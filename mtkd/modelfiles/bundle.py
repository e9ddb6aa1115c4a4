"""MONAI bundles as teachers or students, read without running their config.

A bundle is a folder, or a ``.zip`` of one (at its root or in one top folder), holding
``configs/metadata.json``, ``configs/inference.json`` (or ``.yaml``) and ``models/model.pt``.
MONAI builds a bundle by executing its config (``_target_`` calls, ``$`` Python expressions);
mtkd never does:

- the network comes from ``network_def`` (or what ``network`` names): its ``_target_`` must be
  a class of ``monai.networks.nets`` (or mtkd's ``ThesisUNet``) and its arguments JSON literals
  or ``@key`` references to literals; expressions, other targets and ``%`` macros are refused;
- the weights load with ``torch.load(weights_only=True)``;
- labels come from ``network_data_format.outputs.pred.channel_def`` of the metadata;
  preprocessing from its ``mtkd`` section (bundles mtkd wrote), else from the literal
  ``Spacingd`` / ``ScaleIntensityRanged`` / ``CropForegroundd`` / ``Resized`` steps of the
  config's ``preprocessing``; steps mtkd cannot reproduce are refused by name.

The inputs of a network without an ``mtkd`` section are padded to multiples of 32 for
SwinUNETR and 16 otherwise, unless the network maps onto a registered mtkd network, whose own
divisor is then used.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import stat
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from torch import nn

from mtkd.data.atomic import temporary_sibling
from mtkd.data.labels import LabelTable
from mtkd.data.preprocess import Preprocessing
from mtkd.errors import MTKDError, error_summary, one_line
from mtkd.modelfiles.metadata import (
    check_seal,
    validate_labels,
    validate_metadata,
    validate_preprocessing,
)
from mtkd.modelfiles.model_io import LoadedModel, build_from_spec, sha256_of
from mtkd.models import count_parameters, network_info
from mtkd.models.thesis_unet import ThesisUNet

METADATA = Path("configs") / "metadata.json"
CONFIGS = tuple(Path("configs") / f"inference{s}" for s in (".json", ".yaml", ".yml"))
WEIGHTS = Path("models") / "model.pt"
MTKD_SECTION = "mtkd"
THESIS_TARGET = "mtkd.models.thesis_unet.ThesisUNet"
# MONAI networks that are also registered mtkd networks (same keyword names).
MONAI_REGISTERED = {
    "UNet": "unet",
    "BasicUNet": "basic_unet",
    "SegResNet": "segresnet",
    "SwinUNETR": "swinunetr",
    "DynUNet": "dynunet",
}
# Zips of models (bundles, library imports) are checked before anything is extracted. The
# largest supported network (a SwinUNETR teacher) has about 10^8 parameters, 0.4 GB as float32;
# a bundle may hold it in two or three forms (model.pt, model.ts, model.onnx).
MAX_ZIP_MEMBER = 2 << 30  # bytes, unpacked, of one member
MAX_ZIP_TOTAL = 4 << 30  # bytes, unpacked, of all the members extracted
MAX_ZIP_RATIO = 100  # unpacked / packed size of a member above 1 MiB (weights pack ~1:1)
_RATIO_FREE = 1 << 20
_REFERENCE = re.compile(r"\$?@([A-Za-z_]\w*(?:(?:#|::)\w+)*)")
_ID_SEPARATOR = re.compile(r"::|#")
# Preprocessing steps that do not change what the network sees beyond what mtkd reproduces.
_NEUTRAL_STEPS = {
    "LoadImage",
    "EnsureChannelFirst",
    "AddChannel",
    "EnsureType",
    "ToTensor",
    "ToNumpy",
    "CastToType",
    "SpatialPad",
    "DivisiblePad",
    "Identity",
    "ToDevice",
    "CopyItems",
    "DeleteItems",
    "SelectItems",
    "SaveImage",
    "RepeatChannel",  # the input's num_channels gives the repetition
}
_READ_STEPS = {"Orientation", "Spacing", "ScaleIntensityRange", "CropForeground", "Resize"}
_SPECIAL_KEYS = {"_target_", "_desc_", "_mode_", "_disabled_", "_requires_"}


# --- zips -------------------------------------------------------------------------------------


def cache_root() -> Path:
    """Where zipped bundles are extracted: ``$MTKD_CACHE/bundles`` or ``~/.cache/mtkd/bundles``."""
    base = os.environ.get("MTKD_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "mtkd") / "bundles"


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why zip member ``info`` may not be extracted (escapes the target, a link, no name), or
    None."""
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or PurePosixPath(name).is_absolute():
        return "has an absolute path"
    if PureWindowsPath(info.filename).drive or re.match(r"^[A-Za-z]:", name):
        return "names a drive"
    if ".." in name.split("/"):
        return "climbs out with '..'"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "is a symbolic link"
    if "\x00" in name:
        return "has a NUL character in its name"
    if not info.is_dir() and not [p for p in name.split("/") if p not in ("", ".")]:
        return "has no file name"
    return None


def _unwrite(written: list[Path]) -> None:
    """Remove the files and folders (listed in creation order) of a failed extraction."""
    for path in reversed(written):
        try:
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink()
        except OSError:
            pass


def _makedirs(folder: Path, written: list[Path]) -> None:
    """``folder.mkdir(parents=True, exist_ok=True)``, listing each folder it creates."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
        written.append(path)


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.1f} GiB" if size >= 1 << 30 else f"{size / (1 << 20):.1f} MiB"


def check_zip_sizes(members: list[zipfile.ZipInfo], zip_path: Path) -> None:
    """MTKDError naming ``zip_path`` if ``members`` would unpack to more than
    :data:`MAX_ZIP_TOTAL` in all, a member to more than :data:`MAX_ZIP_MEMBER`, or a member
    above 1 MiB to more than :data:`MAX_ZIP_RATIO` times its packed size (a zip bomb)."""
    total = 0
    for info in members:
        size = info.file_size
        if size > MAX_ZIP_MEMBER:
            raise MTKDError(
                f"refused to extract: member {info.filename!r} would unpack to {_gib(size)} "
                f"(more than {_gib(MAX_ZIP_MEMBER)})",
                zip_path,
            )
        if size > _RATIO_FREE and size > MAX_ZIP_RATIO * max(info.compress_size, 1):
            raise MTKDError(
                f"refused to extract: member {info.filename!r} would unpack to {_gib(size)} from "
                f"{info.compress_size} bytes (more than {MAX_ZIP_RATIO} times; a zip bomb?)",
                zip_path,
            )
        total += size
    if total > MAX_ZIP_TOTAL:
        raise MTKDError(
            f"refused to extract: it would unpack to {_gib(total)} (more than "
            f"{_gib(MAX_ZIP_TOTAL)})",
            zip_path,
        )


def safe_extract(
    zip_path: str | Path, target: str | Path, keep: Callable[[str], bool] | None = None
) -> Path:
    """Extract ``zip_path`` into ``target`` (created if needed) and return ``target``.

    ``keep`` (given a member's name with ``/`` separators) selects the members to extract; by
    default all. Every member is checked before anything is written: an absolute path, a
    drive, a ``..`` component, a symbolic link or a file without a name refuses the whole zip,
    and so do members to extract whose sizes break :func:`check_zip_sizes` (MTKDError naming
    it). A member that cannot be written or decompressed (damaged data, an unsupported
    compression, encryption, clashing names) refuses it too, and what was written is removed.
    """
    zip_path, target = Path(zip_path), Path(target)
    try:
        archive = zipfile.ZipFile(zip_path)
    except Exception as error:  # noqa: BLE001 - a damaged directory fails in many ways
        raise MTKDError(f"not a readable zip file ({error_summary(error)})", zip_path) from None
    with archive:
        members = archive.infolist()
        for info in members:
            problem = _member_problem(info)
            if problem:
                raise MTKDError(f"refused to extract: member {info.filename!r} {problem}", zip_path)
        if keep is not None:
            members = [info for info in members if keep(info.filename.replace("\\", "/"))]
        check_zip_sizes(members, zip_path)
        root = target.resolve()
        plan = []
        for info in members:
            parts = [p for p in info.filename.replace("\\", "/").split("/") if p not in ("", ".")]
            destination = root.joinpath(*parts) if parts else root
            if os.path.commonpath([root, destination.resolve()]) != str(root):
                raise MTKDError(
                    f"refused to extract: member {info.filename!r} lands outside the target",
                    zip_path,
                )
            plan.append((info, destination))
        written: list[Path] = []
        member = None
        try:
            _makedirs(root, written)
            for member, destination in plan:
                if member.is_dir():
                    _makedirs(destination, written)
                    continue
                _makedirs(destination.parent, written)
                existed = destination.exists()
                with archive.open(member) as source, open(destination, "wb") as sink:
                    if not existed:
                        written.append(destination)
                    shutil.copyfileobj(source, sink, 1 << 20)
        except Exception as error:  # noqa: BLE001 - zipfile fails in many ways on a damaged zip
            _unwrite(written)
            where = f"member {member.filename!r}" if member is not None else "the target folder"
            raise MTKDError(
                f"refused to extract: {where} cannot be written or read ({error_summary(error)})",
                zip_path,
            ) from None
    return target


def _bundle_prefix(names: list[str], zip_path: Path) -> str:
    """'' when the bundle is at the zip's root, else its top folder's name."""
    normalized = {n.replace("\\", "/").removeprefix("./") for n in names}
    if METADATA.as_posix() in normalized:
        return ""
    tops = sorted(n.split("/")[0] for n in normalized if n.split("/", 1)[-1] == METADATA.as_posix())
    if len(tops) == 1:
        return tops[0]
    if len(tops) > 1:
        raise MTKDError(f"zip holds several bundles ({', '.join(tops)}); give one", zip_path)
    raise MTKDError("zip holds no MONAI bundle (configs/metadata.json not found)", zip_path)


def bundle_folder(path: str | Path, extract_to: str | Path | None = None) -> Path:
    """The bundle folder of ``path``: the folder itself, or a zip extracted with
    :func:`safe_extract` (into ``extract_to``, else the cache, reused when present)."""
    path = Path(path)
    if not path.exists():
        raise MTKDError("bundle not found", path)
    if path.is_dir():
        return path
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _bundle_prefix(archive.namelist(), path)
    except MTKDError:
        raise
    except Exception as error:  # noqa: BLE001 - a damaged directory fails in many ways
        raise MTKDError(f"not a bundle folder or zip ({error_summary(error)})", path) from None
    if extract_to is not None:
        return safe_extract(path, extract_to) / prefix
    final = cache_root() / sha256_of(path)[:16]
    if not final.is_dir():
        staging = temporary_sibling(final)
        try:
            safe_extract(path, staging)
            try:
                os.replace(staging, final)
            except OSError:
                if not final.is_dir():  # not a concurrent extraction of the same zip
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final / prefix


# --- reading configs without running them ----------------------------------------------------


def _read_mapping(path: Path) -> dict[str, Any]:
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
            return _read_mapping(folder / relative), folder / relative
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


def _follow(config: dict[str, Any], node: Any, name: str, path: Path) -> tuple[Any, str]:
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
        node, name = _follow(config, config["network_def"], "network_def", path)
    elif "network" in config:
        node, name = _follow(config, config["network"], "network", path)
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


# --- weights, labels, preprocessing ----------------------------------------------------------


def read_state_dict(weights: Path) -> dict[str, torch.Tensor]:
    """A state_dict from ``weights`` (plain, or under "model" / "state_dict"), weights-only."""
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure is a refusal
        raise MTKDError(
            f"refused to load weights ({type(error).__name__}): only tensors and plain containers "
            "are accepted (weights_only)",
            weights,
        ) from None
    if isinstance(state, dict):
        for key in ("model", "state_dict", "network"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise MTKDError("weights file holds no state_dict of tensors", weights)
    if all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _pred_format(metadata: dict[str, Any], path: Path) -> dict[str, Any]:
    try:
        pred = metadata["network_data_format"]["outputs"]["pred"]
    except (KeyError, TypeError):
        raise MTKDError("metadata has no network_data_format.outputs.pred", path) from None
    if not isinstance(pred, dict):
        raise MTKDError("network_data_format.outputs.pred is not an object", path)
    return pred


def labels_from_metadata(metadata: dict[str, Any], path: Path) -> tuple[LabelTable, str]:
    """Labels (channels 1..K, background channel 0 left out) and activation from ``channel_def``;
    one output channel means a sigmoid output for label value 1."""
    pred = _pred_format(metadata, path)
    channel_def = pred.get("channel_def")
    if not isinstance(channel_def, dict) or not channel_def:
        raise MTKDError("network_data_format.outputs.pred.channel_def is missing", path)
    names: dict[int, Any] = {}
    for key, name in channel_def.items():
        try:
            names[int(key)] = name
        except (TypeError, ValueError):
            raise MTKDError(f"channel_def key {key!r} is not a channel number", path) from None
    channels = pred.get("num_channels", max(names) + 1)
    if not isinstance(channels, int) or channels < 1:
        raise MTKDError(f"outputs.pred.num_channels is {channels!r}, not a count", path)
    if channels == 1:
        return LabelTable({1: names.get(0)}, source=path), "sigmoid"
    missing = [c for c in range(1, channels) if c not in names]
    if missing:
        raise MTKDError(f"channel_def names no structure for channel(s) {missing}", path)
    return LabelTable({c: names[c] for c in range(1, channels)}, source=path), "softmax"


def _steps(config: dict[str, Any], path: Path, key: str = "preprocessing") -> list[dict[str, Any]]:
    if key not in config:
        return []
    node, name = _follow(config, config[key], key, path)
    if isinstance(node, dict) and "transforms" in node:
        node, name = _follow(config, node["transforms"], f"{name}.transforms", path)
    if not isinstance(node, list):
        raise MTKDError(f"{name} is not a list of transforms", path)
    steps = []
    for index, item in enumerate(node):
        item, _ = _follow(config, item, f"{name}[{index}]", path)
        if not isinstance(item, dict) or not isinstance(item.get("_target_"), str):
            raise MTKDError(f"{name}[{index}] is not a transform (a dict with _target_)", path)
        steps.append(item)
    return steps


def _multilabel_sigmoid(config: dict[str, Any], path: Path) -> bool:
    """True when the config's postprocessing applies a literal sigmoid activation."""
    try:
        steps = _steps(config, path, "postprocessing")
    except MTKDError:
        return False
    return any(
        step["_target_"].rsplit(".", 1)[-1] in ("Activations", "Activationsd")
        and step.get("sigmoid") is True
        for step in steps
    )


def _applies_to_image(step: dict[str, Any], config: dict[str, Any], path: Path) -> bool:
    keys = literal(step.get("keys", "image"), config, path, "transform keys")
    return "image" in ([keys] if isinstance(keys, str) else keys)


def _numbers(value: Any, count: int, where: str, path: Path) -> list[float]:
    values = [value] * count if isinstance(value, (int, float)) else value
    if (
        not isinstance(values, list)
        or len(values) < count
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    ):
        raise MTKDError(f"{where} is {value!r}, not {count} numbers", path)
    return [float(v) for v in values[:count]]


def preprocessing_from_config(
    config: dict[str, Any],
    metadata: dict[str, Any],
    dims: int,
    in_channels: int,
    path: Path,
) -> Preprocessing:
    """Preprocessing read from the literal transforms of a third-party bundle config."""
    found: dict[str, Any] = {}
    unsupported = []
    for step in _steps(config, path):
        target = step["_target_"]
        base = target.rsplit(".", 1)[-1]
        base = base[:-1] if base.endswith("d") else base
        if "." in target and not target.startswith("monai.transforms."):
            base = target  # another package's transform: unknown, whatever its name
        if base in _NEUTRAL_STEPS:
            continue
        if base not in _READ_STEPS:
            unsupported.append(step["_target_"])
            continue
        if not _applies_to_image(step, config, path):
            continue
        where = f"preprocessing {step['_target_']}"
        args = {
            k: literal(v, config, path, f"{where}.{k}")
            for k, v in step.items()
            if k
            in {"pixdim", "a_min", "a_max", "b_min", "b_max", "clip", "axcodes", "spatial_size"}
        }
        if base == "Orientation":
            if args.get("axcodes", "RAS") != "RAS":
                unsupported.append(f"{step['_target_']}(axcodes={args.get('axcodes')!r})")
        elif base == "Spacing":
            if "pixdim" not in args:
                raise MTKDError(f"{where} has no pixdim", path)
            found["spacing"] = tuple(_numbers(args["pixdim"], 3, f"{where}.pixdim", path))
        elif base == "ScaleIntensityRange":
            low, high = (
                _numbers(args.get(k), 1, f"{where}.{k}", path)[0] for k in ("a_min", "a_max")
            )
            b_min, b_max = (args.get("b_min"), args.get("b_max"))
            if (b_min, b_max) != (0, 1):
                raise MTKDError(
                    f"{where} scales to [{b_min}, {b_max}]; mtkd feeds networks the HU window "
                    "scaled to [0, 1] only",
                    path,
                )
            if not args.get("clip", False):
                raise MTKDError(
                    f"{where} does not clip; mtkd clips intensities to the HU window", path
                )
            found["hu_window"] = (low, high)
        elif base == "CropForeground":
            found["crop_foreground"] = True
        elif base == "Resize":
            if dims != 2:
                unsupported.append(step["_target_"])
                continue
            found["slice_size"] = tuple(
                int(v) for v in _numbers(args.get("spatial_size"), 2, f"{where}.spatial_size", path)
            )
    if unsupported:
        raise MTKDError(
            f"preprocessing step(s) {', '.join(unsupported)} cannot be reproduced by mtkd "
            "(it reads Orientationd RAS, Spacingd, ScaleIntensityRanged, CropForegroundd and a "
            "2-D in-plane Resized)",
            path,
        )
    missing = [n for n in ("hu_window",) if n not in found]
    if dims == 2 and "slice_size" not in found:
        missing.append("slice_size (an in-plane Resized for a 2-D network)")
    if missing:
        raise MTKDError(
            f"cannot tell the preprocessing: no {', '.join(missing)} (mtkd needs a literal "
            "ScaleIntensityRanged with b_min 0, b_max 1 and clip, and reads Spacingd pixdim when "
            "present; an mtkd section in the metadata would give them)",
            path,
        )
    return Preprocessing(
        dims=dims,
        hu_window=found["hu_window"],
        spacing=found.get("spacing"),
        crop_foreground=found.get("crop_foreground", False),
        slice_size=found.get("slice_size", (128, 128)),
        patch_size=_patch_size(config, metadata, dims, path),
        in_channels=in_channels,
    )


def _patch_size(
    config: dict[str, Any], metadata: dict[str, Any], dims: int, path: Path
) -> tuple[int, int, int]:
    """roi_size of a literal sliding-window inferer, else a literal input spatial_shape, else 96."""
    if dims == 3 and "inferer" in config:
        try:
            node, _ = _follow(config, config["inferer"], "inferer", path)
            roi = literal(node.get("roi_size"), config, path, "inferer.roi_size")
        except (MTKDError, AttributeError):
            roi = None
        if isinstance(roi, list) and len(roi) == 3 and all(isinstance(v, int) for v in roi):
            return tuple(roi)
    try:
        shape = metadata["network_data_format"]["inputs"]["image"]["spatial_shape"]
    except (KeyError, TypeError):
        shape = None
    if isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) for v in shape):
        return tuple(shape)
    return (96, 96, 96)


# --- specs -----------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    text = json.dumps(value, default=_not_json)
    return json.loads(text)


def _not_json(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON")


def _shapes(network: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in network.state_dict().items()}


def _matches(spec: dict[str, Any], network: nn.Module) -> bool:
    """True if the registered network ``spec`` has exactly ``network``'s parameter shapes."""
    try:
        with torch.device("meta"):
            candidate = build_from_spec(spec)
    except Exception:  # noqa: BLE001 - a spec that does not build does not match
        return False
    return _shapes(candidate) == _shapes(network)


def registry_spec(definition: dict[str, Any], network: nn.Module) -> dict[str, Any] | None:
    """The registered mtkd network spec equivalent to a network definition, or None."""
    cls = network_class(definition["_target_"], Path("."))
    name = "thesis_unet" if cls is ThesisUNet else MONAI_REGISTERED.get(cls.__name__)
    if name is None:
        return None
    arguments = {k: v for k, v in definition.items() if k != "_target_"}
    builder_params = network_info(name).defaults
    if set(arguments) - set(builder_params):
        return None
    class_defaults = {
        n: p.default
        for n, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    params = {}
    for key in builder_params:
        if key in arguments:
            params[key] = arguments[key]
        elif key in class_defaults:
            params[key] = class_defaults[key]
    try:
        spec = {"name": name, "params": _jsonable(params), "reconstruction": "none"}
    except TypeError:
        return None
    return spec if _matches(spec, network) else None


# --- loading ---------------------------------------------------------------------------------


def _require(folder: Path, relative: Path) -> Path:
    if not (folder / relative).is_file():
        raise MTKDError(f"bundle file is missing ({relative.as_posix()})", folder / relative)
    return folder / relative


def _section(metadata: dict[str, Any], path: Path) -> dict[str, Any] | None:
    section = metadata.get(MTKD_SECTION)
    if section is None:
        return None
    if not isinstance(section, dict):
        raise MTKDError("the mtkd section of the metadata is not an object", path)
    return section


def _input_channels(metadata: dict[str, Any], definition: dict[str, Any]) -> int:
    try:
        channels = metadata["network_data_format"]["inputs"]["image"]["num_channels"]
    except (KeyError, TypeError):
        channels = None
    if not isinstance(channels, int) or channels < 1:
        channels = definition.get("in_channels", 1)
    return int(channels) if isinstance(channels, int) else 1


def _output_channels(definition: dict[str, Any]) -> int | None:
    """The output channels a network definition asks for (MONAI's ``out_channels``)."""
    channels = definition.get("out_channels")
    return channels if isinstance(channels, int) and not isinstance(channels, bool) else None


def load_bundle(
    path: str | Path,
    device: str | torch.device = "cpu",
    extract_to: str | Path | None = None,
) -> LoadedModel:
    """Open a MONAI bundle folder or zip as a model, without executing its config."""
    source = Path(path)
    folder = bundle_folder(source, extract_to)
    metadata_file = _require(folder, METADATA)
    config, config_file = read_config(folder)
    weights = _require(folder, WEIGHTS)
    metadata = _read_mapping(metadata_file)
    section = _section(metadata, metadata_file)
    if section is not None:
        check_seal(section, metadata_file, prefix="mtkd.")
    digest = sha256_of(weights)
    if section is not None and section.get("weights_sha256") not in (None, digest):
        raise MTKDError("SHA-256 of the weights does not match the bundle metadata", weights)

    definition = network_definition(config, config_file)
    network = build_network_def(definition, config_file)
    try:
        network.load_state_dict(read_state_dict(weights))
    except RuntimeError as error:
        raise MTKDError(f"weights do not fit the network ({one_line(error)})", weights) from None
    network.to(device).eval()

    spec = None
    if section is not None and isinstance(section.get("network"), dict):
        spec = section["network"] if _matches(section["network"], network) else None
    spec = spec or registry_spec(definition, network)
    out_channels = _output_channels(definition)
    if section is not None:
        validate_metadata(section, metadata_file, out_channels, prefix="mtkd.")
        labels = LabelTable.from_dict(section["labels"], source=metadata_file)
        activation = section["activation"]
        prep = Preprocessing.from_dict(section["preprocessing"])
    else:
        labels, activation = labels_from_metadata(metadata, metadata_file)
        if activation == "softmax" and _multilabel_sigmoid(config, config_file):
            raise MTKDError(
                "the bundle applies a sigmoid to several output channels (multi-label); mtkd "
                "reads one-hot (softmax) outputs or a single sigmoid channel",
                config_file,
            )
        dims = definition.get("spatial_dims", definition.get("dimensions", 3))
        if dims not in (2, 3):
            raise MTKDError(
                f"network_def has spatial_dims {dims!r}; mtkd needs 2 or 3", config_file
            )
        prep = preprocessing_from_config(
            config, metadata, dims, _input_channels(metadata, definition), config_file
        )
        validate_labels(labels.to_dict(), activation, out_channels, metadata_file)
        validate_preprocessing(json.loads(json.dumps(prep.to_dict())), config_file)
    if section is not None and isinstance(section.get("size_multiple"), int):
        size_multiple = section["size_multiple"]
    elif spec is not None:
        size_multiple = network_info(spec["name"], **spec["params"]).size_multiple
    else:
        size_multiple = 32 if type(network).__name__ == "SwinUNETR" else 16
    if spec is None:
        spec = {
            "name": definition["_target_"],
            "params": {k: v for k, v in definition.items() if k != "_target_"},
            "reconstruction": "none",
            "registered": False,
        }
    described = {
        "format": "monai_bundle",
        "name": metadata.get("name") or (section or {}).get("name") or folder.name,
        "network": spec,
        "parameters": count_parameters(network),
        "labels": labels.to_dict(),
        "activation": activation,
        "preprocessing": prep.to_dict(),
        "lineage": (section or {}).get("lineage", {"kind": "monai_bundle", "source": str(source)}),
        "metrics": (section or {}).get("metrics", {}),
        "weights_sha256": digest,
        "bundle": {
            "source": str(source),
            "folder": str(folder),
            "version": metadata.get("version"),
            "monai_version": metadata.get("monai_version"),
            "network_def": definition,
        },
    }
    return LoadedModel(
        network=network,
        labels=labels,
        prep=prep,
        activation=activation,
        metadata=described,
        folder=folder,
        size_multiple=size_multiple,
        has_taps=True,
    )
