"""A per-user disk cache of ONNX exports of PyTorch networks, for the onnxruntime backend.

::

    CACHE/<key>/model.onnx        :func:`mtkd.export.onnx.export_onnx`'s export (dynamic batch
    CACHE/<key>/mtkd_model.json   and spatial axes), its metadata holding the key

``CACHE`` is ``$MTKD_CACHE/onnxruntime``, else ``~/.cache/mtkd/onnxruntime``; it must belong
to the user. The key is the SHA-256 of the network's weights as they are in memory (every
state_dict tensor), its spec, the input layout (dims, channels), the torch, onnx and onnxscript
versions and :data:`CACHE_FORMAT`. An entry is read back only when the metadata's seal, the
SHA-256 of ``model.onnx`` and the recorded key all match; otherwise it is exported again, into
a fresh folder renamed into place, so that no reader ever sees half an entry. Only graphs this
module exported from the user's own weights are ever opened.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from importlib import metadata as package_metadata
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from mtkd.errors import MTKDError
from mtkd.export.common import SegmentationOnly
from mtkd.modelfiles.model_io import LoadedModel
from mtkd.modelfiles.torchscript import checked_export_files

CACHE_FORMAT = 1
KEY_FIELD = "onnxruntime_cache_key"  # top-level metadata key of a cache entry
MAX_ENTRIES = 32  # the least recently used entries beyond this are removed
_TEMPORARY_PREFIX = ".tmp-"


def ort_cache_root() -> Path:
    """``$MTKD_CACHE/onnxruntime``, else ``~/.cache/mtkd/onnxruntime``."""
    base = os.environ.get("MTKD_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "mtkd") / "onnxruntime"


def weights_digest(network: nn.Module) -> str:
    """SHA-256 of every state_dict entry of ``network``: name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _version(package: str) -> str | None:
    try:
        return package_metadata.version(package)
    except package_metadata.PackageNotFoundError:
        return None


def cache_key(model: LoadedModel, network: nn.Module) -> str:
    """The key of ``network`` (the model's PyTorch network, segmentation output only)."""
    prep = model.prep
    fields = {
        "format": CACHE_FORMAT,
        "weights": weights_digest(network),
        "class": f"{type(network).__module__}.{type(network).__qualname__}",
        "spec": model.metadata.get("network"),
        "dims": prep.dims,
        "in_channels": prep.in_channels,
        "size_multiple": model.size_multiple,
        "torch": torch.__version__,
        "onnx": _version("onnx"),
        "onnxscript": _version("onnxscript"),
    }
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _check_owned(folder: Path) -> None:
    """MTKDError naming ``folder`` when another user owns it (POSIX)."""
    if hasattr(os, "getuid") and folder.stat().st_uid != os.getuid():
        raise MTKDError(
            "the onnxruntime cache folder belongs to another user; set MTKD_CACHE to a folder "
            "of your own",
            folder,
        )


def cache_folder(root: Path) -> Path:
    """``root``, created (private to the user) when missing; MTKDError unless it is ours."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_owned(root)
    return root


def sample_ct(model: LoadedModel) -> sitk.Image:
    """A synthetic CT (HU) for the export's own check: an ellipse of soft tissue with noise
    in air, at the model's spacing (1 mm without one), covering its slice or patch size."""
    prep = model.prep
    spacing = tuple(float(s) for s in prep.spacing) if prep.spacing else (1.0, 1.0, 1.0)
    if prep.dims == 2:
        size = (int(prep.slice_size[0]) + 8, int(prep.slice_size[1]) + 8, 8)
    else:
        size = tuple(int(p) + 8 for p in prep.patch_size)
    x, y = np.meshgrid(*(np.linspace(-1.0, 1.0, n) for n in size[:2]), indexing="ij")
    body = (x / 0.9) ** 2 + (y / 0.8) ** 2 < 1.0
    rng = np.random.default_rng(0)
    hu = np.where(body, 40.0, -1000.0)[..., None] + rng.normal(0.0, 30.0, size)
    image = sitk.GetImageFromArray(hu.transpose(2, 1, 0).astype(np.float32))
    image.SetSpacing(spacing)
    return image


def _loadable(folder: Path, key: str) -> Path | None:
    """``folder``'s ``model.onnx`` when the entry is whole and holds ``key``, else None."""
    try:
        metadata, weights = checked_export_files(folder, "onnx")
    except MTKDError:
        return None
    return weights if metadata.get(KEY_FIELD) == key else None


def remove_entry(folder: Path) -> None:
    """Remove a cache entry (a damaged one, or one that failed to open)."""
    shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class CachedExport:
    """The ONNX file of a cache entry, its key, and whether this call exported it."""

    path: Path
    key: str
    exported: bool


def _export_into(root: Path, model: LoadedModel, network: nn.Module, key: str) -> Path:
    """Export into a fresh hidden folder of ``root`` and rename it to ``root/key``; when
    another process won the race with a whole entry, keep that one."""
    from mtkd.export.onnx import export_onnx

    final = root / key
    staging = root / f"{_TEMPORARY_PREFIX}{secrets.token_hex(6)}"
    keyed = dataclasses.replace(model, network=network, metadata={**model.metadata, KEY_FIELD: key})
    try:
        export_onnx(keyed, staging / "export", sample_ct(model), sample_name="synthetic CT")
        remove_entry(final)
        try:
            os.replace(staging / "export", final)
        except OSError:
            if _loadable(final, key) is None:
                raise
    finally:
        remove_entry(staging)
    return final / "model.onnx"


def _modified(path: Path) -> float:
    """Modification time of ``path``; 0 when another process just removed it."""
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _prune(root: Path, keep: Path) -> None:
    """Remove the least recently used entries beyond :data:`MAX_ENTRIES` (never ``keep``),
    and staging folders of exports killed more than a day ago."""
    day_ago = time.time() - 86400
    for staging in root.glob(f"{_TEMPORARY_PREFIX}*"):
        if _modified(staging) < day_ago:
            remove_entry(staging)
    entries = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    entries.sort(key=_modified, reverse=True)
    for folder in entries[MAX_ENTRIES:]:
        if folder != keep:
            remove_entry(folder)


def cached_onnx_export(
    model: LoadedModel, network: nn.Module, root: Path | None = None
) -> CachedExport:
    """The ONNX export of ``network`` (the model's PyTorch network) from the cache under
    ``root`` (default :func:`ort_cache_root`), exported now when missing or damaged.

    MTKDError (naming the model folder) when the network cannot be exported."""
    root = cache_folder(Path(root) if root is not None else ort_cache_root())
    segmentation = SegmentationOnly(network).eval()
    key = cache_key(model, segmentation)
    folder = root / key
    if folder.is_dir():
        _check_owned(folder)
        found = _loadable(folder, key)
        if found is not None:
            os.utime(folder)  # most recently used
            return CachedExport(found, key, exported=False)
    try:
        path = _export_into(root, model, network, key)
    except MTKDError as error:
        raise MTKDError(
            f"cannot export to ONNX for onnxruntime: {error.problem}", model.folder
        ) from None
    _prune(root, keep=folder)
    return CachedExport(path, key, exported=True)
