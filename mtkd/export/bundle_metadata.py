"""What a bundle we write says about itself: ``configs/metadata.json`` (MONAI's fields and our
``mtkd`` section), ``docs/README.md`` and the ``LICENSE`` note."""

from __future__ import annotations

import time
from importlib import metadata as package_metadata
from typing import Any

import numpy as np
import torch
from torch import nn

import mtkd
from mtkd.data.preprocess import Preprocessing
from mtkd.errors import MTKDError
from mtkd.modelfiles.bundle import MTKD_SECTION
from mtkd.modelfiles.model_io import LoadedModel
from mtkd.models.thesis_unet import ThesisUNet

SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
    "meta_schema_20220324.json"
)
SECTION_VERSION = 1


def _version(package: str) -> str | None:
    try:
        return package_metadata.version(package)
    except package_metadata.PackageNotFoundError:
        return None


def _spatial_shape(prep: Preprocessing, size_multiple: int) -> list[str]:
    return [f"{size_multiple}*n"] * prep.dims


def _channel_def(model: LoadedModel) -> dict[str, str]:
    values = model.labels.label_values
    if model.activation == "sigmoid":
        if len(values) != 1:
            raise MTKDError("a sigmoid model must have exactly one label", model.folder)
        return {"0": model.labels[values[0]]}
    if values != list(range(1, len(values) + 1)):
        raise MTKDError(
            f"label values {values} are not 1..{len(values)} (one output channel each)",
            model.folder,
        )
    return {"0": "background", **model.labels.to_dict()}


def bundle_metadata(
    model: LoadedModel,
    network: nn.Module,
    spec: dict[str, Any],
    weights_sha256: str,
    *,
    name: str,
    version: str,
    authors: str,
    copyright: str,
) -> dict[str, Any]:
    """MONAI's metadata fields plus the ``mtkd`` section."""
    prep = model.prep
    structures = ", ".join(model.labels.names)
    channels = _channel_def(model)
    window = _window(prep)
    copies = f", repeated to {prep.in_channels} channels" if prep.in_channels > 1 else ""
    return {
        "schema": SCHEMA_URL,
        "version": version,
        "changelog": {version: f"exported by mtkd {mtkd.__version__} from '{model.name}'"},
        "monai_version": _version("monai") or "unknown",
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": _required_packages(spec, network),
        "name": name,
        "task": f"CT segmentation of {structures}",
        "description": _description(prep, structures),
        "authors": authors,
        "copyright": copyright,
        "data_source": "see mtkd.lineage and docs/README.md",
        "data_type": "nibabel",
        "image_classes": f"single-channel CT, {window}{copies}",
        "label_classes": ", ".join(f"{v} is {n}" for v, n in model.labels.items())
        + ", 0 is everything else",
        "pred_classes": (
            f"{len(channels)} channel logits, "
            + ", ".join(f"{c}: {n}" for c, n in channels.items())
        ),
        "intended_use": "Research only; not for clinical use.",
        "network_data_format": _network_data_format(prep, model.size_multiple, channels),
        MTKD_SECTION: _mtkd_section(model, spec, weights_sha256, name),
    }


def _window(prep: Preprocessing) -> str:
    low, high = prep.hu_window
    return f"HU window [{low:g}, {high:g}] scaled to [0, 1]"


def _required_packages(spec: dict[str, Any], network: nn.Module) -> dict[str, str]:
    """The packages the bundle's network needs beyond MONAI and PyTorch, with their versions."""
    required = {"nibabel": _version("nibabel") or "unknown"}
    if spec.get("name") == "swinunetr" or "SwinUNETR" in str(spec.get("name")):
        required["einops"] = _version("einops") or "unknown"
    if isinstance(network, ThesisUNet):
        required["mtkd"] = mtkd.__version__
    return required


def _description(prep: Preprocessing, structures: str) -> str:
    spacing = "native" if prep.spacing is None else " x ".join(f"{s:g}" for s in prep.spacing)
    kind = "axial slices" if prep.dims == 2 else "3-D patches"
    return (
        f"A {prep.dims}-D network segmenting {structures} in CT ({kind}, {_window(prep)}, "
        f"spacing {spacing} mm), trained with mtkd."
    )


def _network_data_format(
    prep: Preprocessing, size_multiple: int, channels: dict[str, str]
) -> dict[str, Any]:
    """MONAI's ``network_data_format``: the input image (the HU window in [0, 1]) and the
    predicted logits, one channel per entry of ``channels``."""
    shape = _spatial_shape(prep, size_multiple)
    return {
        "inputs": {
            "image": {
                "type": "image",
                "format": "hounsfield",
                "modality": "CT",
                "num_channels": prep.in_channels,
                "spatial_shape": shape,
                "dtype": "float32",
                "value_range": [0, 1],
                "is_patch_data": True,
                "channel_def": {str(c): f"CT, {_window(prep)}" for c in range(prep.in_channels)},
            }
        },
        "outputs": {
            "pred": {
                "type": "image",
                "format": "segmentation",
                "num_channels": len(channels),
                "spatial_shape": shape,
                "dtype": "float32",
                "value_range": [],
                "is_patch_data": True,
                "channel_def": channels,
            }
        },
    }


def _mtkd_section(
    model: LoadedModel, spec: dict[str, Any], weights_sha256: str, name: str
) -> dict[str, Any]:
    """Our section: what mtkd reads back (labels, preprocessing, network spec), the lineage
    and the weights' SHA-256; ``export_check`` is filled in once the bundle is checked."""
    source = model.metadata
    return {
        "format_version": SECTION_VERSION,
        "mtkd_version": mtkd.__version__,
        "name": name,
        "network": spec,
        "labels": model.labels.to_dict(),
        "activation": model.activation,
        "preprocessing": model.prep.to_dict(),
        "size_multiple": model.size_multiple,
        "lineage": {
            **source.get("lineage", {}),
            "exported_from": {
                "path": str(model.folder),
                "network": source.get("network"),
                "weights_sha256": source.get("weights_sha256"),
            },
            "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "metrics": source.get("metrics", {}),
        "weights_sha256": weights_sha256,
        "export_check": None,
    }


def bundle_readme(metadata: dict[str, Any]) -> str:
    """``docs/README.md``: what the model is, its labels, preprocessing and lineage."""
    section = metadata[MTKD_SECTION]
    prep = section["preprocessing"]
    network = metadata["network_data_format"]
    rows = "\n".join(f"| {c} | {n} |" for c, n in network["outputs"]["pred"]["channel_def"].items())
    teacher = section["lineage"].get("teacher")
    teacher_line = (
        f"- teacher: `{teacher.get('network')}` from `{teacher.get('path')}` "
        f"(weights SHA-256 `{teacher.get('weights_sha256')}`)\n"
        if isinstance(teacher, dict)
        else "- teacher: none (trained directly)\n"
    )
    needs_mtkd = "mtkd" in metadata["required_packages_version"]
    mtkd_note = (
        " The network class is mtkd's own ThesisUNet, so the `mtkd` package must be installed."
        if needs_mtkd
        else ""
    )
    if prep["dims"] == 2:
        grid = f"axial slices resized to {prep['slice_size']}"
    else:
        grid = f"3-D windows of {prep['patch_size']}"
    check = section.get("export_check") or {}
    return f"""# {metadata["name"]}

{metadata["description"]}

{metadata["intended_use"]}

## Output channels

| channel | structure |
|---|---|
{rows}

## Preprocessing

- orientation RAS; spacing {prep["spacing"] or "native"} mm
- HU window {prep["hu_window"]} scaled to [0, 1] and clipped
- crop to the body: {"yes" if prep["crop_foreground"] else "no"}
- {grid}; input channels: {prep["in_channels"]}
- the network needs spatial sizes divisible by {section["size_multiple"]}

## Running it

    python -m monai.bundle run --config_file configs/inference.json \\
        --bundle_root . --dataset_dir /path/to/niftis --output_dir /path/to/output

(the command line needs MONAI's optional `fire` package; `monai.bundle.run(...)` with the same
keywords works from Python). Each `*.nii.gz` / `*.nii` of `dataset_dir` becomes
`output_dir/<name>_seg.nii.gz`. The config needs no pytorch-ignite.{mtkd_note}

## Lineage

- exported with mtkd {section["mtkd_version"]} on {section["lineage"].get("exported")}
- from `{section["lineage"]["exported_from"]["path"]}`
{teacher_line}- weights SHA-256 `{section["weights_sha256"]}`
- export check: largest logit difference {check.get("max_abs_diff")} (allowed {check.get("bound")})
  on a real CT sample of shape {check.get("sample_shape")}

See `LICENSE` for licensing.
"""


LICENSE_TEXT = """Licensing note for this bundle

The weights in models/model.pt were trained by the user of mtkd; their licence is set by
whoever trained them and must respect the licences of the training data (see
docs/README.md and the mtkd section of configs/metadata.json for the lineage). No licence is
granted by this file.

The configs were generated by mtkd (Apache License 2.0).
"""
