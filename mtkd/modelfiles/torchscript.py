"""Open a TorchScript model: our export folder, or a lone TorchScript file.

The metadata a model needs (labels, preprocessing, output activation) comes from the export
folder's ``mtkd_model.json`` (whose SHA-256 must match the file), else from the file itself
(the extra file ``mtkd_model.json`` our exporter embeds), else from a sidecar ``<file>.json``.
The metadata helpers here are shared with :mod:`mtkd.modelfiles.onnx`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from mtkd.data.labels import LabelTable
from mtkd.data.preprocess import Preprocessing
from mtkd.errors import MTKDError, error_summary
from mtkd.modelfiles.files import model_folder
from mtkd.modelfiles.metadata import check_seal, validate_metadata
from mtkd.modelfiles.model_io import METADATA, LoadedModel, sha256_of

DEFAULT_SIZE_MULTIPLE = 16
_REQUIRED = ("labels", "preprocessing", "activation")
_DEFAULT_FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}


def missing_metadata_error(path: Path, kind: str) -> MTKDError:
    """The error for a lone model file without metadata: what is needed and how to give it."""
    return MTKDError(
        f"this {kind} file carries no mtkd metadata. A model needs its labels (label value -> "
        "structure name), its preprocessing (dims, hu_window, spacing, crop_foreground, "
        "slice_size, patch_size, in_channels) and its output activation (softmax or sigmoid). "
        f"Export it with 'mtkd export', which embeds them, or write them to "
        f"{path.name}.json next to it (keys labels, preprocessing, activation, as in "
        f"{METADATA})",
        path,
    )


def read_json_file(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; MTKDError naming the file otherwise."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise MTKDError(f"unreadable model metadata ({error})", path) from None
    if not isinstance(data, dict):
        raise MTKDError("model metadata must be a JSON object", path)
    return data


def parse_embedded(text: str | bytes, path: Path) -> dict[str, Any]:
    """The metadata JSON object embedded in model file ``path``."""
    try:
        data = json.loads(text)
    except ValueError as error:
        raise MTKDError(f"the embedded {METADATA} is not valid JSON ({error})", path) from None
    if not isinstance(data, dict):
        raise MTKDError(f"the embedded {METADATA} is not a JSON object", path)
    return data


def sidecar(path: Path) -> Path:
    """``model.ts`` -> ``model.ts.json``: where a lone model file's metadata may lie."""
    return path.with_name(path.name + ".json")


def export_folder(path: Path) -> Path | None:
    """The folder holding our ``mtkd_model.json`` for ``path`` (itself or its ``model/``)."""
    if not path.is_dir():
        return None
    if (model_folder(path) / METADATA).is_file():
        return model_folder(path)
    raise MTKDError(f"not a model folder ({METADATA} not found)", path)


def checked_export_files(folder: Path, fmt: str) -> tuple[dict[str, Any], Path]:
    """(metadata, weights file) of our ``fmt`` export in ``folder``; the file's SHA-256 must
    match the metadata."""
    metadata = read_json_file(folder / METADATA)
    check_seal(metadata, folder / METADATA)
    validate_metadata(metadata, folder / METADATA)
    if metadata.get("format") != fmt:
        raise MTKDError(
            f"not a {fmt} export (format {metadata.get('format', 'pytorch')!r})", folder / METADATA
        )
    name = metadata.get("weights_file", _DEFAULT_FILES[fmt])
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise MTKDError(f"weights_file must be a file name in the folder, not {name!r}", folder)
    weights = folder / name
    if not weights.is_file():
        raise MTKDError("model file is missing", weights)
    if sha256_of(weights) != metadata.get("weights_sha256"):
        raise MTKDError(
            "SHA-256 of the model file does not match the metadata (the file was changed or "
            "damaged); export the model again",
            weights,
        )
    return metadata, weights


def size_multiple_of(metadata: dict[str, Any]) -> int:
    """What each spatial size is padded up to: the metadata's, the network spec's, or 16."""
    value = metadata.get("size_multiple")
    if isinstance(value, int) and value >= 1:
        return value
    spec = metadata.get("network")
    if isinstance(spec, dict) and "name" in spec:
        from mtkd.models import network_info

        try:
            return network_info(spec["name"], **spec.get("params", {})).size_multiple
        except (MTKDError, TypeError):
            pass
    return DEFAULT_SIZE_MULTIPLE


def loaded_model(network: Any, metadata: dict[str, Any], folder: Path, source: Path) -> LoadedModel:
    """A :class:`LoadedModel` (without taps) from ``network`` and its metadata, checked."""
    check_seal(metadata, source)
    validate_metadata(metadata, source)
    missing = [key for key in _REQUIRED if key not in metadata]
    if missing:
        raise MTKDError(
            f"model metadata lacks {', '.join(missing)} (needed: {', '.join(_REQUIRED)})", source
        )
    try:
        labels = LabelTable.from_dict(metadata["labels"])
        prep = Preprocessing.from_dict(metadata["preprocessing"])
    except (KeyError, TypeError, ValueError) as error:
        reason = getattr(error, "problem", None) or f"{type(error).__name__}: {error}"
        raise MTKDError(f"invalid model metadata ({reason})", source) from None
    activation = metadata["activation"]
    if activation not in ("softmax", "sigmoid"):
        raise MTKDError(f"activation must be softmax or sigmoid, not {activation!r}", source)
    metadata.setdefault("name", source.stem)
    return LoadedModel(
        network=network,
        labels=labels,
        prep=prep,
        activation=activation,
        metadata=metadata,
        folder=folder,
        size_multiple=size_multiple_of(metadata),
        has_taps=False,
    )


def _jit_load(
    path: Path, device: str | torch.device, extra: dict[str, Any]
) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as error:  # noqa: BLE001 - corrupt archives fail in many ways
        raise MTKDError(
            f"not a readable TorchScript file (corrupt or truncated?): {error_summary(error)}",
            path,
        ) from None


def load_torchscript(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Open our TorchScript export folder, or a lone TorchScript file, on ``device``.

    The network maps (B, C_in, *S) to logits (B, C_out, *S); it has no feature taps.
    """
    path = Path(path)
    if not path.exists():
        raise MTKDError("model not found", path)
    folder = export_folder(path)
    extra: dict[str, Any] = {METADATA: ""}
    if folder is not None:
        metadata, weights = checked_export_files(folder, "torchscript")
        network = _jit_load(weights, device, extra)
    else:
        folder, weights = path.parent, path
        network = _jit_load(path, device, extra)
        if extra[METADATA]:
            metadata = parse_embedded(extra[METADATA], path)
        elif sidecar(path).is_file():
            metadata = read_json_file(sidecar(path))
        else:
            raise missing_metadata_error(path, "TorchScript")
        metadata["weights_sha256"] = sha256_of(path)
    network.eval()
    return loaded_model(network, metadata, folder, weights)
