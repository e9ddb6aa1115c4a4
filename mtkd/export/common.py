"""The pieces every exporter shares (:mod:`mtkd.export.torchscript`, :mod:`mtkd.export.onnx`):
the segmentation-only network, CT samples, the output folder's checks, staging, metadata and
publishing.

An export folder holds the weights file and the source model's metadata::

    OUT/model.ts | OUT/model.onnx   the exported network (segmentation logits only)
    OUT/mtkd_model.json             labels, preprocessing, network spec, lineage, metrics,
                                    plus format, weights_file, weights_sha256,
                                    source_weights_sha256, exporter and export_check, and
                                    metadata_sha256 (mtkd.modelfiles.metadata)

The weights are written into a temporary sibling folder, checked numerically against the
PyTorch network on a real CT sample (and on a second sample of another size), and only then
moved into ``OUT``; the metadata is written last, atomically.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import SimpleITK as sitk
import torch
from torch import nn
from torch.nn import functional as F

from mtkd.data.atomic import atomic_path, atomic_write_bytes
from mtkd.data.image_io import check_writable
from mtkd.errors import MTKDError
from mtkd.export.verify import check_export
from mtkd.infer.inference import first_output
from mtkd.modelfiles.metadata import CHECKSUM_KEY, seal
from mtkd.modelfiles.model_io import METADATA, LoadedModel, sha256_of
from mtkd.models.multitask import MultiTaskNet

EXPORT_FORMATS = ("torchscript", "onnx", "bundle")
WEIGHTS_FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}
# Keys this module writes; dropped from the source metadata before an export adds its own.
_EXPORT_KEYS = (
    "format",
    "weights_file",
    "weights_sha256",
    CHECKSUM_KEY,
    "source_weights_sha256",
    "exporter",
    "export_check",
    "exported",
)


class SegmentationOnly(nn.Module):
    """What segmentation inference needs of a network: (B, C_in, *S) -> logits (B, C_out, *S).

    A multi-task teacher contributes only its backbone (no reconstruction decoder); a network
    returning a list (deep supervision) contributes its main output.
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network.backbone if isinstance(network, MultiTaskNet) else network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return first_output(self.network(x))


def pytorch_network(model: LoadedModel, path: Path) -> nn.Module:
    """The model's PyTorch network in eval mode on the CPU (a CPU copy if it lives elsewhere)."""
    network = model.network
    if not isinstance(network, nn.Module):
        raise MTKDError(
            f"only a PyTorch model can be exported (this one is {type(network).__name__}); "
            "export from the model or run folder it came from",
            path,
        )
    devices = {p.device.type for p in network.parameters()} | {
        b.device.type for b in network.buffers()
    }
    if devices - {"cpu"}:
        network = copy.deepcopy(network).cpu()
    return network.eval()


def load_sample(sample: sitk.Image | str | Path) -> tuple[sitk.Image, str]:
    """(image, description for the metadata) of a CT given as an image or a path."""
    if isinstance(sample, sitk.Image):
        size = "x".join(str(s) for s in sample.GetSize())
        return sample, f"in-memory image {size}"
    from mtkd.data.image_io import read_image

    return read_image(sample), str(Path(sample).resolve())


def other_size_sample(sample: torch.Tensor, multiple: int) -> torch.Tensor:
    """(B, C, *S) -> (B', C, *(S + multiple)): the sample edge-padded by one size multiple;
    B' = 1 if B > 1, else 2 (the second a mirrored copy), so batch and sizes both change."""
    spatial = sample.dim() - 2
    padded = F.pad(sample, (0, multiple) * spatial, mode="replicate")
    if sample.shape[0] > 1:
        return padded[:1].contiguous()
    return torch.cat([padded, padded.flip(-1)]).contiguous()


def verify_both_sizes(
    reference: nn.Module,
    exported: Any,
    sample: torch.Tensor,
    multiple: int,
    path: Path,
    relative_bound: float,
    sample_name: str,
) -> dict[str, Any]:
    """check_export on ``sample`` and on :func:`other_size_sample`; the metadata record."""
    record = check_export(reference, exported, sample, path, relative_bound)
    second = other_size_sample(sample, multiple)
    try:
        other = check_export(reference, exported, second, path, relative_bound)
    except MTKDError as error:
        raise MTKDError(
            f"{error.problem}, at input shape {tuple(second.shape)} (it matched at "
            f"{tuple(sample.shape)}: the export only fits the traced input size)",
            path,
        ) from None
    record.update(sample=sample_name, relative_bound=relative_bound, other_size=other)
    return record


def _export_format(folder: Path) -> str | None:
    """The format of our export in ``folder``, or None if it holds none."""
    try:
        metadata = json.loads((folder / METADATA).read_text())
    except (OSError, ValueError):
        return None
    fmt = metadata.get("format") if isinstance(metadata, dict) else None
    return fmt if fmt in WEIGHTS_FILES else None


def check_output_folder(out: Path, fmt: str) -> None:
    """Refuse an existing ``out`` unless it is empty or an earlier export of ours in ``fmt``."""
    if out.exists() and not out.is_dir():
        raise MTKDError("the export destination is a file; give a folder", out)
    check_writable(out / METADATA)  # a file among the folders above ``out``, or no access
    if not out.is_dir() or not any(out.iterdir()):
        return
    existing = _export_format(out)
    if existing is None:
        raise MTKDError(
            f"folder is not empty and holds no mtkd export ({METADATA} with a format); "
            "choose an empty or new folder",
            out,
        )
    if existing != fmt:
        raise MTKDError(
            f"folder holds a {existing} export; choose another folder for the {fmt} export", out
        )


@contextmanager
def staging_folder(out: Path) -> Iterator[Path]:
    """A fresh hidden folder next to ``out`` (same file system), removed afterwards."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".tmp-{secrets.token_hex(6)}-{out.name}"
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_metadata(model: LoadedModel, fmt: str) -> dict[str, Any]:
    """The source metadata (labels, preprocessing, network, lineage, metrics) for an export
    in ``fmt``, without the fields known only once the file is written and checked."""
    metadata = {k: v for k, v in model.metadata.items() if k not in _EXPORT_KEYS}
    metadata.update(
        name=model.name,
        labels=model.labels.to_dict(),
        preprocessing=model.prep.to_dict(),
        activation=model.activation,
        size_multiple=int(model.size_multiple),
        format=fmt,
        weights_file=WEIGHTS_FILES[fmt],
        source_weights_sha256=model.metadata.get("weights_sha256"),
        exported={
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "source": str(model.folder.resolve()),
            "torch_version": torch.__version__,
        },
    )
    return metadata


def metadata_text(metadata: dict[str, Any]) -> str:
    """The JSON text of ``metadata`` with its ``metadata_sha256`` (for files and embedding)."""
    return json.dumps(seal(metadata), indent=2, default=str) + "\n"


def publish_export(staged: Path, out: Path, metadata: dict[str, Any]) -> dict[str, Any]:
    """Move the checked weights file ``staged`` into ``out`` and write the metadata (with the
    file's SHA-256) last; both atomically. Returns the metadata written."""
    out.mkdir(parents=True, exist_ok=True)
    target = out / metadata["weights_file"]
    digest = sha256_of(staged)
    with atomic_path(target) as temporary:
        os.replace(staged, temporary)
    metadata = seal({**metadata, "weights_sha256": digest})
    atomic_write_bytes(out / METADATA, metadata_text(metadata).encode())
    return metadata
