"""What mtkd reads from a third-party bundle's transforms: its preprocessing, and whether its
postprocessing is a multi-label sigmoid.

Preprocessing comes from the literal ``Orientationd`` (RAS), ``Spacingd``,
``ScaleIntensityRanged``, ``CropForegroundd`` and (2-D) ``Resized`` steps of the config's
``preprocessing``; steps that do not change what the network sees are skipped, and steps mtkd
cannot reproduce are refused by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mtkd.data.preprocess import Preprocessing
from mtkd.errors import MTKDError
from mtkd.modelfiles.bundle_config import follow_references, literal

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
_READ_ARGUMENTS = {"pixdim", "a_min", "a_max", "b_min", "b_max", "clip", "axcodes", "spatial_size"}


def _steps(config: dict[str, Any], path: Path, key: str = "preprocessing") -> list[dict[str, Any]]:
    """The transforms (dicts with a ``_target_``) of the list or ``Compose`` at ``config[key]``,
    references followed by name; none when the config has no ``key``."""
    if key not in config:
        return []
    node, name = follow_references(config, config[key], key, path)
    if isinstance(node, dict) and "transforms" in node:
        node, name = follow_references(config, node["transforms"], f"{name}.transforms", path)
    if not isinstance(node, list):
        raise MTKDError(f"{name} is not a list of transforms", path)
    steps = []
    for index, item in enumerate(node):
        item, _ = follow_references(config, item, f"{name}[{index}]", path)
        if not isinstance(item, dict) or not isinstance(item.get("_target_"), str):
            raise MTKDError(f"{name}[{index}] is not a transform (a dict with _target_)", path)
        steps.append(item)
    return steps


def multilabel_sigmoid(config: dict[str, Any], path: Path) -> bool:
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
        base = _step_name(step["_target_"])
        if base in _NEUTRAL_STEPS:
            continue
        if base not in _READ_STEPS:
            unsupported.append(step["_target_"])
            continue
        if not _applies_to_image(step, config, path):
            continue
        read = _read_step(base, step, config, dims, path)
        if isinstance(read, str):
            unsupported.append(read)
        else:
            found.update(read)
    _check_complete(found, unsupported, dims, path)
    return Preprocessing(
        dims=dims,
        hu_window=found["hu_window"],
        spacing=found.get("spacing"),
        crop_foreground=found.get("crop_foreground", False),
        slice_size=found.get("slice_size", (128, 128)),
        patch_size=_patch_size(config, metadata, dims, path),
        in_channels=in_channels,
    )


def _step_name(target: str) -> str:
    """A MONAI transform's class name without its dictionary ``d`` (``Spacingd`` -> ``Spacing``);
    another package's transform keeps its full dotted name (unknown, whatever its name)."""
    base = target.rsplit(".", 1)[-1]
    base = base[:-1] if base.endswith("d") else base
    if "." in target and not target.startswith("monai.transforms."):
        base = target
    return base


def _read_step(
    base: str, step: dict[str, Any], config: dict[str, Any], dims: int, path: Path
) -> dict[str, Any] | str:
    """The preprocessing settings one of :data:`_READ_STEPS` gives (``base`` is its
    :func:`_step_name`), or the step as named among those mtkd cannot reproduce."""
    where = f"preprocessing {step['_target_']}"
    args = {
        k: literal(v, config, path, f"{where}.{k}") for k, v in step.items() if k in _READ_ARGUMENTS
    }
    if base == "Orientation":
        if args.get("axcodes", "RAS") != "RAS":
            return f"{step['_target_']}(axcodes={args.get('axcodes')!r})"
        return {}
    if base == "Spacing":
        if "pixdim" not in args:
            raise MTKDError(f"{where} has no pixdim", path)
        return {"spacing": tuple(_numbers(args["pixdim"], 3, f"{where}.pixdim", path))}
    if base == "ScaleIntensityRange":
        return {"hu_window": _hu_window(args, where, path)}
    if base == "CropForeground":
        return {"crop_foreground": True}
    # Resize
    if dims != 2:
        return step["_target_"]
    size = _numbers(args.get("spatial_size"), 2, f"{where}.spatial_size", path)
    return {"slice_size": tuple(int(v) for v in size)}


def _hu_window(args: dict[str, Any], where: str, path: Path) -> tuple[float, float]:
    """The HU window of a ``ScaleIntensityRanged`` that scales it to [0, 1] and clips."""
    low, high = (_numbers(args.get(k), 1, f"{where}.{k}", path)[0] for k in ("a_min", "a_max"))
    b_min, b_max = (args.get("b_min"), args.get("b_max"))
    if (b_min, b_max) != (0, 1):
        raise MTKDError(
            f"{where} scales to [{b_min}, {b_max}]; mtkd feeds networks the HU window "
            "scaled to [0, 1] only",
            path,
        )
    if not args.get("clip", False):
        raise MTKDError(f"{where} does not clip; mtkd clips intensities to the HU window", path)
    return (low, high)


def _check_complete(found: dict[str, Any], unsupported: list[str], dims: int, path: Path) -> None:
    """MTKDError naming the steps mtkd cannot reproduce, else the settings none of the steps
    gave (the HU window; the slice size of a 2-D network)."""
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


def _patch_size(
    config: dict[str, Any], metadata: dict[str, Any], dims: int, path: Path
) -> tuple[int, int, int]:
    """roi_size of a literal sliding-window inferer, else a literal input spatial_shape, else 96."""
    if dims == 3 and "inferer" in config:
        try:
            node, _ = follow_references(config, config["inferer"], "inferer", path)
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
