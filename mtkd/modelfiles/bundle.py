"""MONAI bundles as teachers or students, read without running their config.

A bundle is a folder, or a ``.zip`` of one (at its root or in one top folder), holding
``configs/metadata.json``, ``configs/inference.json`` (or ``.yaml``) and ``models/model.pt``.
MONAI builds a bundle by executing its config (``_target_`` calls, ``$`` Python expressions);
mtkd never does:

- the network comes from ``network_def`` (or what ``network`` names): its ``_target_`` must be
  a class of ``monai.networks.nets`` (or mtkd's ``ThesisUNet``) and its arguments JSON literals
  or ``@key`` references to literals; expressions, other targets and ``%`` macros are refused
  (:mod:`mtkd.modelfiles.bundle_config`);
- the weights load with ``torch.load(weights_only=True)``;
- labels come from ``network_data_format.outputs.pred.channel_def`` of the metadata;
  preprocessing from its ``mtkd`` section (bundles mtkd wrote), else from the literal
  ``Spacingd`` / ``ScaleIntensityRanged`` / ``CropForegroundd`` / ``Resized`` steps of the
  config's ``preprocessing``; steps mtkd cannot reproduce are refused by name
  (:mod:`mtkd.modelfiles.bundle_transforms`);
- a zip is extracted with :func:`mtkd.modelfiles.zips.safe_extract`.

The inputs of a network without an ``mtkd`` section are padded to multiples of 32 for
SwinUNETR and 16 otherwise, unless the network maps onto a registered mtkd network, whose own
divisor is then used.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtkd.data.atomic import temporary_sibling
from mtkd.data.labels import LabelTable
from mtkd.data.preprocess import Preprocessing
from mtkd.errors import MTKDError, error_summary, one_line
from mtkd.modelfiles.bundle_config import (
    build_network_def,
    network_class,
    network_definition,
    read_config,
    read_mapping,
)
from mtkd.modelfiles.bundle_transforms import multilabel_sigmoid, preprocessing_from_config
from mtkd.modelfiles.metadata import (
    check_seal,
    validate_labels,
    validate_metadata,
    validate_preprocessing,
)
from mtkd.modelfiles.model_io import LoadedModel, build_from_spec, sha256_of
from mtkd.modelfiles.zips import safe_extract
from mtkd.models import count_parameters, network_info
from mtkd.models.thesis_unet import ThesisUNet

METADATA = Path("configs") / "metadata.json"
WEIGHTS = Path("models") / "model.pt"
MTKD_SECTION = "mtkd"
# MONAI networks that are also registered mtkd networks (same keyword names).
MONAI_REGISTERED = {
    "UNet": "unet",
    "BasicUNet": "basic_unet",
    "SegResNet": "segresnet",
    "SwinUNETR": "swinunetr",
    "DynUNet": "dynunet",
}


# --- the bundle folder ------------------------------------------------------------------------


def cache_root() -> Path:
    """Where zipped bundles are extracted: ``$MTKD_CACHE/bundles`` or ``~/.cache/mtkd/bundles``."""
    base = os.environ.get("MTKD_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "mtkd") / "bundles"


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


# --- weights and labels -----------------------------------------------------------------------


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
    """The metadata's ``mtkd`` section (a bundle mtkd wrote) with its seal checked, or None."""
    section = metadata.get(MTKD_SECTION)
    if section is None:
        return None
    if not isinstance(section, dict):
        raise MTKDError("the mtkd section of the metadata is not an object", path)
    check_seal(section, path, prefix="mtkd.")
    return section


def _weights_digest(section: dict[str, Any] | None, weights: Path) -> str:
    """SHA-256 of ``weights``, checked against the one the ``mtkd`` section records."""
    digest = sha256_of(weights)
    if section is not None and section.get("weights_sha256") not in (None, digest):
        raise MTKDError("SHA-256 of the weights does not match the bundle metadata", weights)
    return digest


def _network_with_weights(
    definition: dict[str, Any], weights: Path, config_file: Path, device: str | torch.device
) -> nn.Module:
    """The network of a checked ``network_def`` with the bundle's weights, on ``device``, in
    eval mode."""
    network = build_network_def(definition, config_file)
    try:
        network.load_state_dict(read_state_dict(weights))
    except RuntimeError as error:
        raise MTKDError(f"weights do not fit the network ({one_line(error)})", weights) from None
    network.to(device).eval()
    return network


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


def _read_from_section(
    section: dict[str, Any], metadata_file: Path, definition: dict[str, Any]
) -> tuple[LabelTable, str, Preprocessing]:
    """Labels, activation and preprocessing as the ``mtkd`` section of a bundle we wrote gives
    them, validated."""
    validate_metadata(section, metadata_file, _output_channels(definition), prefix="mtkd.")
    labels = LabelTable.from_dict(section["labels"], source=metadata_file)
    return labels, section["activation"], Preprocessing.from_dict(section["preprocessing"])


def _read_from_config(
    config: dict[str, Any],
    config_file: Path,
    metadata: dict[str, Any],
    metadata_file: Path,
    definition: dict[str, Any],
) -> tuple[LabelTable, str, Preprocessing]:
    """Labels, activation and preprocessing of a third-party bundle, read from its metadata's
    ``channel_def`` and its config's literal transforms, validated."""
    labels, activation = labels_from_metadata(metadata, metadata_file)
    if activation == "softmax" and multilabel_sigmoid(config, config_file):
        raise MTKDError(
            "the bundle applies a sigmoid to several output channels (multi-label); mtkd "
            "reads one-hot (softmax) outputs or a single sigmoid channel",
            config_file,
        )
    dims = definition.get("spatial_dims", definition.get("dimensions", 3))
    if dims not in (2, 3):
        raise MTKDError(f"network_def has spatial_dims {dims!r}; mtkd needs 2 or 3", config_file)
    prep = preprocessing_from_config(
        config, metadata, dims, _input_channels(metadata, definition), config_file
    )
    validate_labels(labels.to_dict(), activation, _output_channels(definition), metadata_file)
    validate_preprocessing(json.loads(json.dumps(prep.to_dict())), config_file)
    return labels, activation, prep


def _size_multiple(
    section: dict[str, Any] | None, spec: dict[str, Any] | None, network: nn.Module
) -> int:
    """What the input sides must be multiples of: as the ``mtkd`` section says, else as the
    registered network says, else 32 for SwinUNETR and 16 otherwise."""
    if section is not None and isinstance(section.get("size_multiple"), int):
        return section["size_multiple"]
    if spec is not None:
        return network_info(spec["name"], **spec["params"]).size_multiple
    return 32 if type(network).__name__ == "SwinUNETR" else 16


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
    metadata = read_mapping(metadata_file)
    section = _section(metadata, metadata_file)
    digest = _weights_digest(section, weights)
    definition = network_definition(config, config_file)
    network = _network_with_weights(definition, weights, config_file, device)

    spec = None
    if section is not None and isinstance(section.get("network"), dict):
        spec = section["network"] if _matches(section["network"], network) else None
    spec = spec or registry_spec(definition, network)
    if section is not None:
        labels, activation, prep = _read_from_section(section, metadata_file, definition)
    else:
        labels, activation, prep = _read_from_config(
            config, config_file, metadata, metadata_file, definition
        )
    size_multiple = _size_multiple(section, spec, network)
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
