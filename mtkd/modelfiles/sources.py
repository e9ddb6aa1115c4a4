"""Open a model from wherever a user has it, as one ``LoadedModel``.

Accepted sources (a teacher or a student):

- our model folder (``mtkd_model.json`` + weights), or a run folder (its ``model/``);
- our exported TorchScript or ONNX folder (``mtkd_model.json`` with ``"format"``);
- a training checkpoint of ours (``RUN/checkpoints/*.pt``: it carries the model metadata);
- a MONAI bundle: a folder with ``configs/metadata.json`` or a ``.zip`` of one;
- a TorchScript file (``.ts``, ``.pt``, ``.pth``, ``.zip`` holding ``constants.pkl``).

Stored segmentations of another tool (label or probability maps) are not models: see
``is_stored_output`` and ``mtkd.data.stored_outputs``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from mtkd.data.image_io import IMAGE_SUFFIXES
from mtkd.errors import MTKDError, error_summary
from mtkd.modelfiles.files import model_folder
from mtkd.modelfiles.model_io import METADATA, LoadedModel, load_model

# what another tool's stored segmentation may be (mtkd.data.stored_outputs reads them)
STORED_SUFFIXES = (*IMAGE_SUFFIXES, ".npz")


def is_stored_output(path: str | Path) -> bool:
    """True for an image file (or a folder of them) that holds another tool's segmentation."""
    path = Path(path)
    if path.is_file():
        return path.name.lower().endswith(STORED_SUFFIXES)
    if path.is_dir() and not is_model_folder(path) and not is_bundle_folder(path):
        return any(child.name.lower().endswith(STORED_SUFFIXES) for child in path.iterdir())
    return False


def is_model_folder(path: Path) -> bool:
    """Whether ``path`` is our model folder, or a run folder holding one in ``model/``."""
    return (model_folder(path) / METADATA).is_file()


def is_bundle_folder(path: Path) -> bool:
    """Whether ``path`` is an unpacked MONAI bundle (it has ``configs/metadata.json``)."""
    return (path / "configs" / "metadata.json").is_file()


def is_torchscript_zip(path: Path) -> bool:
    """TorchScript archives are zips holding ``*/constants.pkl`` and ``*/code/``."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") for name in archive.namelist())
    except Exception:  # noqa: BLE001 - a damaged zip (e.g. an undecodable name) is not one
        return False


def folder_format(folder: Path) -> str:
    """The ``format`` of a model folder's metadata ("pytorch" when absent or unreadable)."""
    import json

    metadata_file = model_folder(folder) / METADATA
    try:
        metadata = json.loads(metadata_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "pytorch"  # load_model reports the unreadable metadata
    return metadata.get("format", "pytorch") if isinstance(metadata, dict) else "pytorch"


def load_any_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Open any supported model source (see the module docstring) on ``device``."""
    path = Path(path)
    if not path.exists():
        raise MTKDError("model not found", path=path)
    if path.is_dir():
        if is_model_folder(path):
            kind = folder_format(path)
            if kind == "torchscript":
                from mtkd.modelfiles.torchscript import load_torchscript

                return load_torchscript(path, device)
            if kind == "onnx":
                from mtkd.modelfiles.onnx import load_onnx

                return load_onnx(path, device)
            return load_model(path, device)
        if is_bundle_folder(path):
            from mtkd.modelfiles.bundle import load_bundle

            return load_bundle(path, device)
        raise MTKDError(
            "not a model: expected a run or model folder (mtkd_model.json), a MONAI bundle "
            "(configs/metadata.json) or a TorchScript/ONNX file",
            path=path,
        )
    if path.suffix == ".onnx":
        from mtkd.modelfiles.onnx import load_onnx

        return load_onnx(path, device)
    if zipfile.is_zipfile(path):
        if is_torchscript_zip(path):
            from mtkd.modelfiles.torchscript import load_torchscript

            return load_torchscript(path, device)
        if path.suffix == ".zip":
            from mtkd.modelfiles.bundle import load_bundle

            return load_bundle(path, device)
        return load_checkpoint_model(path, device)
    raise MTKDError(
        "not a model file (neither TorchScript, ONNX, a MONAI bundle zip nor a checkpoint)", path
    )


def load_checkpoint_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """The network of a training checkpoint of ours (``RUN/checkpoints/last.pt`` or ``best.pt``)."""
    from mtkd.modelfiles.checkpoint import load_checkpoint
    from mtkd.modelfiles.model_io import model_from_state

    path = Path(path)
    try:
        state = load_checkpoint(path)
    except MTKDError:
        raise
    except Exception as error:  # noqa: BLE001 - a damaged file fails in many ways inside torch
        raise MTKDError(
            f"checkpoint is corrupt or not a weights-only file ({error_summary(error)})", path
        ) from None
    metadata = state.get("model_metadata")
    if not isinstance(metadata, dict):
        raise MTKDError("this checkpoint carries no model metadata (an older mtkd wrote it)", path)
    if "model" not in state:
        raise MTKDError("this checkpoint holds no model weights", path)
    return model_from_state(metadata, state["model"], path.parent, device, source=path)
