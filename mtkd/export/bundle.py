"""A model of ours as a MONAI bundle, checked numerically and with MONAI's own bundle checks.

::

    BUNDLE/configs/metadata.json   MONAI metadata (versions, network_data_format, ...) and an
                                   ``mtkd`` section (labels, preprocessing, network spec,
                                   lineage, SHA-256 of model.pt, the numerical export check)
    BUNDLE/configs/inference.json  ``python -m monai.bundle run --config_file
                                   configs/inference.json`` segments every NIfTI in ``data/``
    BUNDLE/models/model.pt         state_dict of the segmentation network
    BUNDLE/docs/README.md          what the model is, labels, preprocessing, lineage
    BUNDLE/LICENSE                 licensing note

MONAI networks are written with their ``monai.networks.nets`` class; the thesis U-Nets have
none, so their bundles name ``mtkd.models.thesis_unet.ThesisUNet`` and need the mtkd package.
A multi-task teacher is written as its segmentation network (the reconstruction decoder is a
training aid). The inference config needs no pytorch-ignite: it runs a plain loop.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from importlib import metadata as package_metadata
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

import mtkd
from mtkd.data.atomic import atomic_path, atomic_write_bytes, temporary_sibling
from mtkd.data.image_io import check_writable
from mtkd.data.preprocess import Preprocessing
from mtkd.errors import MTKDError
from mtkd.export.verify import check_export, sample_input
from mtkd.modelfiles.bundle import (
    METADATA,
    MONAI_REGISTERED,
    MTKD_SECTION,
    THESIS_TARGET,
    WEIGHTS,
    bundle_folder,
    load_bundle,
    network_definition,
    read_config,
)
from mtkd.modelfiles.metadata import seal
from mtkd.modelfiles.model_io import LoadedModel, sha256_of
from mtkd.models import MultiTaskNet, network_info
from mtkd.models.monai_nets import dynunet_strides, segresnet_blocks_up, unet_strides
from mtkd.models.thesis_unet import ThesisUNet

SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
    "meta_schema_20220324.json"
)
SCHEMA_RESOURCE = "monai_bundle_schema.json"
CONFIG = Path("configs") / "inference.json"
README = Path("docs") / "README.md"
LICENSE = Path("LICENSE")
SECTION_VERSION = 1


# --- the network definition ------------------------------------------------------------------


def _unet(p: dict[str, Any]) -> dict[str, Any]:
    keys = ("kernel_size", "up_kernel_size", "num_res_units", "act", "norm", "dropout")
    return {
        "channels": list(p["channels"]),
        "strides": list(unet_strides(p["channels"], p["strides"])),
        **{k: p[k] for k in keys},
    }


def _basic_unet(p: dict[str, Any]) -> dict[str, Any]:
    return {k: p[k] for k in ("features", "dropout", "upsample")}


def _segresnet(p: dict[str, Any]) -> dict[str, Any]:
    return {
        "init_filters": p["init_filters"],
        "blocks_down": list(p["blocks_down"]),
        "blocks_up": list(segresnet_blocks_up(p["blocks_down"], p["blocks_up"])),
        "dropout_prob": p["dropout_prob"],
        "upsample_mode": p["upsample_mode"],
    }


def _swinunetr(p: dict[str, Any]) -> dict[str, Any]:
    keys = ("feature_size", "depths", "num_heads", "drop_rate", "attn_drop_rate")
    return {k: p[k] for k in (*keys, "dropout_path_rate", "use_checkpoint", "use_v2")}


def _dynunet(p: dict[str, Any]) -> dict[str, Any]:
    strides = dynunet_strides(p["depth"], p["strides"])
    return {
        "kernel_size": [3] * len(strides) if p["kernel_size"] is None else p["kernel_size"],
        "strides": strides,
        "upsample_kernel_size": strides[1:]
        if p["upsample_kernel_size"] is None
        else p["upsample_kernel_size"],
        "filters": p["filters"],
        "dropout": p["dropout"],
        "res_block": p["res_block"],
    }


# Registered MONAI-backed networks -> the arguments of their monai.networks.nets class.
_MONAI_ARGUMENTS = {
    "unet": _unet,
    "basic_unet": _basic_unet,
    "segresnet": _segresnet,
    "swinunetr": _swinunetr,
    "dynunet": _dynunet,
}


def _thesis_arguments(network: ThesisUNet) -> dict[str, Any]:
    encoders = [network.get_submodule(f"enc{i}")[0] for i in range(1, network.levels + 1)]
    return {
        "in_channels": encoders[0].in_channels,
        "out_channels": network.head.out_channels,
        "channels": [conv.out_channels for conv in encoders],
        "bottleneck": network.bottleneck[0].out_channels,
        "convs_per_block": network.convs_per_block,
        "spatial_dims": network.spatial_dims,
    }


def segmentation_network(model: LoadedModel) -> tuple[nn.Module, dict[str, Any]]:
    """The network a bundle holds (a multi-task teacher's backbone) and its ``network_def``."""
    network = model.network
    kind = model.metadata.get("format", "pytorch")
    if isinstance(network, torch.jit.ScriptModule) or kind in ("torchscript", "onnx"):
        raise MTKDError(
            f"a MONAI bundle is written from a PyTorch model, not a {kind} export", model.folder
        )
    if isinstance(network, MultiTaskNet):
        network = network.backbone
    if kind == "monai_bundle":
        return network, dict(model.metadata["bundle"]["network_def"])
    if isinstance(network, ThesisUNet):
        return network, {"_target_": THESIS_TARGET, **_thesis_arguments(network)}
    spec = model.metadata.get("network") or {}
    name = spec.get("name")
    if name not in _MONAI_ARGUMENTS:
        raise MTKDError(f"network '{name}' has no MONAI class to write in a bundle", model.folder)
    params = network_info(name, **spec.get("params", {})).params
    shared = {k: params[k] for k in ("spatial_dims", "in_channels", "out_channels")}
    classes = {registered: monai for monai, registered in MONAI_REGISTERED.items()}
    arguments = {**shared, **_MONAI_ARGUMENTS[name](params)}
    definition = {"_target_": f"monai.networks.nets.{classes[name]}", **arguments}
    return network, json.loads(json.dumps(definition))


def _plain_spec(model: LoadedModel) -> dict[str, Any]:
    """The network spec of what the bundle holds: no reconstruction decoder."""
    spec = dict(model.metadata.get("network") or {})
    for key in ("mask_ratio", "mask_patch", "recon_convs"):
        spec.pop(key, None)
    spec["reconstruction"] = "none"
    return spec


# --- the inference config --------------------------------------------------------------------


def _preprocessing(prep: Preprocessing) -> list[dict[str, Any]]:
    low, high = prep.hu_window
    steps: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {
            "_target_": "Orientationd",
            "keys": "image",
            "axcodes": "RAS",
            "labels": [["L", "R"], ["P", "A"], ["I", "S"]],
        },
    ]
    if prep.spacing is not None:
        steps.append(
            {
                "_target_": "Spacingd",
                "keys": "image",
                "pixdim": list(prep.spacing),
                "mode": "bilinear",
            }
        )
    steps.append(
        {
            "_target_": "ScaleIntensityRanged",
            "keys": "image",
            "a_min": low,
            "a_max": high,
            "b_min": 0.0,
            "b_max": 1.0,
            "clip": True,
        }
    )
    if prep.crop_foreground:
        steps.append(
            {
                "_target_": "CropForegroundd",
                "keys": "image",
                "source_key": "image",
                "margin": 2,
                "allow_smaller": True,
            }
        )
    if prep.dims == 2:
        size = [*prep.slice_size, -1]
        steps.append(
            {"_target_": "Resized", "keys": "image", "spatial_size": size, "mode": "bilinear"}
        )
    else:
        steps.append(
            {"_target_": "SpatialPadd", "keys": "image", "spatial_size": list(prep.patch_size)}
        )
    if prep.in_channels > 1:
        steps.append({"_target_": "RepeatChanneld", "keys": "image", "repeats": prep.in_channels})
    return steps


def inference_config(
    definition: dict[str, Any], prep: Preprocessing, activation: str, labels: int
) -> dict[str, Any]:
    """A MONAI inference config: NIfTI files of ``dataset_dir`` -> ``output_dir/*_seg.nii.gz``."""
    if prep.dims == 2:
        inferer = {
            "_target_": "SliceInferer",
            "spatial_dim": 2,
            "roi_size": list(prep.slice_size),
            "sw_batch_size": 16,
        }
    else:
        inferer = {
            "_target_": "SlidingWindowInferer",
            "roi_size": list(prep.patch_size),
            "sw_batch_size": 4,
            "overlap": 0.25,
        }
    if activation == "sigmoid":
        activate = {"_target_": "Activationsd", "keys": "pred", "sigmoid": True}
        discrete = {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5}
    else:
        activate = {"_target_": "Activationsd", "keys": "pred", "softmax": True}
        discrete = {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}
    one_case = "@inferer(item['image'][None].to(@device), @network)[0]"
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "dataset_dir": "$os.path.join(@bundle_root, 'data')",
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii.gz')) + "
        "glob.glob(os.path.join(@dataset_dir, '*.nii')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": definition,
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": _preprocessing(prep)},
        "dataset_data": "$[{'image': path} for path in @datalist]",
        "dataset": {"_target_": "Dataset", "data": "@dataset_data", "transform": "@preprocessing"},
        "inferer": inferer,
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                activate,
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "nearest_interp": False,
                    "to_tensor": True,
                },
                discrete,
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_postfix": "seg",
                    "output_dtype": "$numpy.uint8" if labels < 256 else "$numpy.int16",
                    "resample": False,
                    "separate_folder": False,
                },
            ],
        },
        "checkpoint": "$torch.load(os.path.join(@bundle_root, 'models', 'model.pt'), "
        "map_location=@device, weights_only=True)",
        "initialize": [
            "$torch.set_grad_enabled(False)",
            "$@network.load_state_dict(@checkpoint)",
            "$@network.eval()",
        ],
        "run": [f"$[@postprocessing({{**item, 'pred': {one_case}}}).clear() for item in @dataset]"],
    }


# --- metadata and docs -----------------------------------------------------------------------


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
    low, high = prep.hu_window
    structures = ", ".join(model.labels.names)
    channels = _channel_def(model)
    shape = _spatial_shape(prep, model.size_multiple)
    required = {"nibabel": _version("nibabel") or "unknown"}
    if spec.get("name") == "swinunetr" or "SwinUNETR" in str(spec.get("name")):
        required["einops"] = _version("einops") or "unknown"
    if isinstance(network, ThesisUNet):
        required["mtkd"] = mtkd.__version__
    window = f"HU window [{low:g}, {high:g}] scaled to [0, 1]"
    spacing = "native" if prep.spacing is None else " x ".join(f"{s:g}" for s in prep.spacing)
    copies = f", repeated to {prep.in_channels} channels" if prep.in_channels > 1 else ""
    kind = "axial slices" if prep.dims == 2 else "3-D patches"
    source = model.metadata
    return {
        "schema": SCHEMA_URL,
        "version": version,
        "changelog": {version: f"exported by mtkd {mtkd.__version__} from '{model.name}'"},
        "monai_version": _version("monai") or "unknown",
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": required,
        "name": name,
        "task": f"CT segmentation of {structures}",
        "description": (
            f"A {prep.dims}-D network segmenting {structures} in CT ({kind}, {window}, spacing "
            f"{spacing} mm), trained with mtkd."
        ),
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
        "network_data_format": {
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
                    "channel_def": {str(c): f"CT, {window}" for c in range(prep.in_channels)},
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
        },
        MTKD_SECTION: {
            "format_version": SECTION_VERSION,
            "mtkd_version": mtkd.__version__,
            "name": name,
            "network": spec,
            "labels": model.labels.to_dict(),
            "activation": model.activation,
            "preprocessing": prep.to_dict(),
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
        },
    }


def _readme(metadata: dict[str, Any]) -> str:
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


# --- writing and verifying -------------------------------------------------------------------


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def _check_target(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise MTKDError("bundle target exists and is not a folder", folder)
    check_writable(folder / METADATA)  # a file among the folders above, or no access
    if not folder.exists() or not any(folder.iterdir()):
        return
    try:
        ours = MTKD_SECTION in json.loads((folder / METADATA).read_text())
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise MTKDError("bundle target folder is not empty (and not a bundle mtkd wrote)", folder)


def _move_into(staging: Path, folder: Path) -> None:
    for source in sorted(p for p in staging.rglob("*") if p.is_file()):
        destination = folder / source.relative_to(staging)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, destination)


def write_bundle(
    model: LoadedModel,
    folder: str | Path,
    sample_image: sitk.Image,
    *,
    name: str | None = None,
    version: str = "0.1.0",
    authors: str = "unspecified (exported with mtkd)",
    copyright: str = "unspecified; see LICENSE",
) -> dict[str, Any]:
    """Write ``model`` as a MONAI bundle in ``folder`` and return its metadata.

    The bundle is assembled next to ``folder``, rebuilt with :func:`load_bundle`, compared with
    ``model`` on ``sample_image`` (:func:`check_export`, recorded in ``mtkd.export_check``),
    checked with :func:`verify_bundle`, and only then moved into ``folder`` file by file.
    """
    folder = Path(folder)
    _check_target(folder)
    network, definition = segmentation_network(model)
    spec = _plain_spec(model)
    staging = temporary_sibling(folder)
    staging.mkdir(parents=True)
    try:
        with atomic_path(staging / WEIGHTS) as temporary:
            state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
            torch.save(state, temporary)
        metadata = bundle_metadata(
            model,
            network,
            spec,
            sha256_of(staging / WEIGHTS),
            name=name or model.name,
            version=version,
            authors=authors,
            copyright=copyright,
        )
        config = inference_config(definition, model.prep, model.activation, len(model.labels))
        _write_json(staging / CONFIG, config)
        metadata[MTKD_SECTION] = seal(metadata[MTKD_SECTION])
        _write_json(staging / METADATA, metadata)
        rebuilt = load_bundle(staging)
        if rebuilt.labels != model.labels or rebuilt.prep != model.prep:
            raise MTKDError("the bundle reads back with other labels or preprocessing", folder)
        sample = sample_input(model, sample_image)
        metadata[MTKD_SECTION]["export_check"] = check_export(
            model.network, rebuilt.network, sample, folder
        )
        metadata[MTKD_SECTION] = seal(metadata[MTKD_SECTION])
        _write_json(staging / METADATA, metadata)
        atomic_write_bytes(staging / README, _readme(metadata).encode())
        atomic_write_bytes(staging / LICENSE, LICENSE_TEXT.encode())
        verify_bundle(staging)
        folder.mkdir(parents=True, exist_ok=True)
        _move_into(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return metadata


def _fake_size_factor(metadata: dict[str, Any]) -> int:
    """``n`` for MONAI's fake input: sides of at least 16 (64 for divisors of 32 and more)."""
    try:
        shape = metadata["network_data_format"]["inputs"]["image"]["spatial_shape"]
    except (KeyError, TypeError):
        return 1
    multiples = [
        int(m.group(1))
        for item in shape
        if isinstance(item, str) and (m := re.fullmatch(r"\s*(\d+)\s*\*\s*n\s*", item))
    ]
    if not multiples:
        return 1
    multiple = max(multiples)
    return max(1, math.ceil((64 if multiple >= 32 else 16) / multiple))


@contextmanager
def _quiet_monai() -> Iterator[None]:
    """MONAI's bundle checks log every step at INFO; keep warnings and errors only."""
    logger = logging.getLogger("monai.bundle.scripts")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def verify_bundle(folder: str | Path, schema: str | Path | None = None) -> None:
    """MONAI's ``verify_metadata`` (against ``schema``, default mtkd's offline schema) and
    ``verify_net_in_out`` on the bundle's network, then a weights-only load of the bundle.

    Nothing of the bundle's config is executed: MONAI gets a config holding only the checked,
    literal ``network_def``. Failures raise MTKDError naming the bundle.
    """
    from monai.bundle import verify_metadata, verify_net_in_out

    path = Path(folder)
    root = bundle_folder(path)
    metadata_file = root / METADATA
    if not metadata_file.is_file():
        raise MTKDError("bundle file is missing (configs/metadata.json)", metadata_file)
    config, config_file = read_config(root)
    definition = network_definition(config, config_file)
    try:
        metadata = json.loads(metadata_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise MTKDError(f"unreadable metadata ({error})", metadata_file) from None
    with ExitStack() as stack:
        stack.enter_context(_quiet_monai())
        if schema is None:
            traversable = resources.files("mtkd").joinpath("resources", SCHEMA_RESOURCE)
            schema_file = stack.enter_context(resources.as_file(traversable))
        else:
            schema_file = Path(schema)
        if not schema_file.is_file():  # MONAI would try to download it
            raise MTKDError("schema file not found", schema_file)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no hash value provided" for the local schema
            try:
                verify_metadata(
                    meta_file=str(metadata_file), filepath=str(schema_file), create_dir=False
                )
            except Exception as error:  # noqa: BLE001 - MONAI raises several types
                raise MTKDError(
                    f"bundle metadata fails MONAI's check against {schema_file.name}: {error}",
                    path,
                ) from None
        with tempfile.TemporaryDirectory(prefix="mtkd-bundle-") as scratch:
            network_only = Path(scratch) / "network.json"
            network_only.write_text(json.dumps({"network_def": definition}))
            try:
                verify_net_in_out(
                    net_id="network_def",
                    meta_file=str(metadata_file),
                    config_file=str(network_only),
                    device="cpu",
                    n=_fake_size_factor(metadata),
                )
            except Exception as error:  # noqa: BLE001 - MONAI raises several types
                raise MTKDError(
                    f"bundle network fails MONAI's input/output check: {error}", path
                ) from None
    load_bundle(root)
