"""Exported models: a folder with the weights and the metadata needed to use them.

::

    MODEL/model.pt          state_dict of the network (loaded with weights_only=True)
    MODEL/mtkd_model.json   network name and parameters, labels, preprocessing, output
                            activation, lineage (teacher), metrics, SHA-256 of model.pt,
                            SHA-256 of the metadata itself (mtkd.modelfiles.metadata)

A run folder can stand for its model (``RUN/model``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtkd.data.image_io import atomic_path, atomic_write_bytes
from mtkd.data.labels import LabelTable
from mtkd.data.preprocess import Preprocessing
from mtkd.errors import MTKDError, error_summary, one_line
from mtkd.modelfiles.files import FORMAT_VERSION, METADATA, WEIGHTS, model_folder, sha256_of
from mtkd.modelfiles.metadata import check_seal, seal, validate_metadata
from mtkd.models import build_teacher, count_parameters

# A spec building more parameters than this is refused before any memory is allocated for it
# (the largest supported networks have about 10^8).
MAX_PARAMETERS = 2_000_000_000


@dataclass
class LoadedModel:
    """A network ready for inference plus what it needs to be applied correctly."""

    network: nn.Module
    labels: LabelTable
    prep: Preprocessing
    activation: str  # "softmax" or "sigmoid"
    metadata: dict[str, Any]
    folder: Path
    # Whole-volume inference pads each spatial size up to a multiple of this.
    size_multiple: int = 16
    # Feature taps (forward hooks) need a real nn.Module; TorchScript and ONNX models have none.
    has_taps: bool = True

    @property
    def name(self) -> str:
        return self.metadata.get("name", self.folder.name)


def build_from_spec(network: dict[str, Any]) -> nn.Module:
    """Build a network from its spec {"name", "params", "reconstruction", "mask_ratio"?,
    "mask_patch"?} (as stored in the model metadata)."""
    reconstruction = network.get("reconstruction", "none")
    masking = {k: network[k] for k in ("mask_ratio", "mask_patch") if k in network}
    return build_teacher(
        network["name"], reconstruction=reconstruction, **masking, **network["params"]
    )


def export_model(
    network: nn.Module,
    folder: str | Path,
    *,
    spec: dict[str, Any],
    labels: LabelTable,
    prep: Preprocessing,
    activation: str,
    lineage: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    name: str | None = None,
    postprocessing: dict[str, Any] | None = None,
) -> Path:
    """Write ``network``'s weights and metadata to ``folder`` (each file atomically);
    ``postprocessing``: the choice made on validation
    (:func:`mtkd.engine.validation.largest_part_choice`), applied by default by ``mtkd
    segment``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS
    with atomic_path(weights) as temporary:
        torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, temporary)
    metadata = {
        "format_version": FORMAT_VERSION,
        "name": name or folder.parent.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "network": spec,
        "parameters": count_parameters(network),
        "labels": labels.to_dict(),
        "activation": activation,
        "preprocessing": prep.to_dict(),
        "lineage": lineage,
        "metrics": metrics or {},
        "weights_sha256": sha256_of(weights),
    }
    if postprocessing is not None:
        metadata["postprocessing"] = postprocessing
    text = json.dumps(seal(metadata), indent=2) + "\n"
    atomic_write_bytes(folder / METADATA, text.encode())
    return folder


def resolve_model_folder(path: str | Path) -> Path:
    """A model folder, or the ``model/`` folder of a run."""
    path = Path(path)
    if not path.exists():
        raise MTKDError("model not found", path=path)
    if (model_folder(path) / METADATA).is_file():
        return model_folder(path)
    raise MTKDError(f"not a model or run folder ({METADATA} not found)", path=path)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load an exported model; the SHA-256 of its weights and of its metadata must match,
    the metadata must pass the schema (:mod:`mtkd.modelfiles.metadata`), and the weights
    load weights-only."""
    folder = resolve_model_folder(path)
    try:
        metadata = json.loads((folder / METADATA).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MTKDError(f"unreadable model metadata ({error})", path=folder / METADATA) from None
    if not isinstance(metadata, dict):
        raise MTKDError("model metadata is not a JSON object", path=folder / METADATA)
    check_seal(metadata, folder / METADATA)
    if metadata.get("format", "pytorch") != "pytorch":
        raise MTKDError(
            f"invalid model metadata: format is {one_line(repr(metadata['format']), 60)}, not "
            "pytorch (open exported models with load_any_model)",
            path=folder / METADATA,
        )
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise MTKDError("model weights are missing", path=weights)
    if sha256_of(weights) != metadata.get("weights_sha256"):
        raise MTKDError("SHA-256 of the weights does not match the metadata", path=weights)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure is a refusal
        raise MTKDError(f"refused to load weights ({type(error).__name__})", path=weights) from None
    return model_from_state(
        metadata, state, folder, device, source=weights, metadata_source=folder / METADATA
    )


def _is_state_dict(state: Any) -> bool:
    return isinstance(state, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    )


def network_info_of(spec: dict[str, Any]):
    """The registry's :class:`NetworkInfo` of a (checked) network spec."""
    from mtkd.models import network_info

    return network_info(spec["name"], **spec["params"])


def _build_network(spec: dict[str, Any], where: Path) -> nn.Module:
    """The network of a checked spec; its size is checked on the meta device first."""
    try:
        with torch.device("meta"):
            count = count_parameters(build_from_spec(spec))
        if count > MAX_PARAMETERS:
            raise MTKDError(
                f"invalid model metadata: network.params build {count:,} parameters (more than "
                f"{MAX_PARAMETERS:,})",
                where,
            )
        return build_from_spec(spec)
    except MTKDError as error:
        if error.path is not None:
            raise
        raise MTKDError(f"invalid model metadata: network: {error.problem}", where) from None
    except (
        KeyError,
        TypeError,
        ValueError,
        AttributeError,
        RuntimeError,
        MemoryError,
        OverflowError,
        IndexError,
        ZeroDivisionError,
    ) as error:
        raise MTKDError(
            f"invalid model metadata: network.params cannot build it ({error_summary(error)})",
            where,
        ) from None


def model_from_state(
    metadata: dict[str, Any],
    state: dict[str, torch.Tensor],
    folder: Path,
    device: str | torch.device,
    source: Path,
    metadata_source: Path | None = None,
) -> LoadedModel:
    """Build the network of ``metadata`` and load ``state`` (read from ``source``) into it.

    Metadata that cannot describe a model raises MTKDError naming ``metadata_source`` (default
    ``source``), weights that are not a state_dict fitting the network MTKDError naming
    ``source``.
    """
    where = metadata_source or source
    if not isinstance(metadata, dict):
        raise MTKDError("model metadata is not a JSON object", path=where)
    validate_metadata(metadata, where, require_network=True)
    spec = metadata["network"]
    network = _build_network(spec, where)
    labels = LabelTable.from_dict(metadata["labels"], source=where)
    prep = Preprocessing.from_dict(metadata["preprocessing"])
    activation = metadata["activation"]
    size_multiple = network_info_of(spec).size_multiple
    if not _is_state_dict(state):
        raise MTKDError("the weights file holds no state_dict of named tensors", path=source)
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise MTKDError(
            f"weights do not fit the network ({one_line(error)})", path=source
        ) from None
    network.to(device).eval()
    return LoadedModel(
        network=network,
        labels=labels,
        prep=prep,
        activation=activation,
        metadata=metadata,
        folder=folder,
        size_multiple=size_multiple,
    )
