"""What ``mtkd compare`` compares: anything that segments a CT (:class:`Segmenter`), a loaded
model (:class:`ModelSegmenter`) or another tool's stored output (:class:`StoredSegmentation`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import SimpleITK as sitk
from torch import nn

from mtkd.data.image_io import strip_image_suffix
from mtkd.data.labels import LabelTable, label_values_in
from mtkd.data.stored_outputs import read_stored_map, stored_label_table
from mtkd.errors import MTKDError
from mtkd.models import count_parameters


@runtime_checkable
class Segmenter(Protocol):
    """Anything that segments a CT: ``predict(image)`` returns an object with ``labelmap``
    (on the image's grid, values of ``labels``), ``seconds`` and, if known,
    ``peak_memory_bytes``."""

    name: str
    labels: LabelTable
    parameters: int | None

    def predict(self, image: sitk.Image) -> Any: ...


@dataclass
class StoredPrediction:
    """A stored segmentation read onto the image's grid (no inference cost)."""

    labelmap: sitk.Image
    seconds: float = 0.0
    peak_memory_bytes: int = 0
    plan: str = "stored"


class ModelSegmenter:
    """A :class:`~mtkd.infer.predictor.Predictor` seen as a :class:`Segmenter`."""

    def __init__(self, predictor: Any):
        model = predictor.model
        self.predictor = predictor
        self.name: str = model.name
        self.labels: LabelTable = model.labels
        self.parameters: int | None = _parameter_count(model)

    def predict(self, image: sitk.Image) -> Any:
        return self.predictor.predict(image)


def _parameter_count(model: Any) -> int | None:
    """Parameters of the network when it has any, else the metadata's ``parameters``."""
    network = getattr(model, "network", None)
    if isinstance(network, nn.Module):
        count = count_parameters(network)
        if count > 0:
            return count
    stored = getattr(model, "metadata", {}).get("parameters")
    return stored if isinstance(stored, int) and not isinstance(stored, bool) else None


def _stored_name(path: Path) -> str:
    name = path.name
    for ending in (".seg.nrrd", ".npz"):
        if name.lower().endswith(ending):
            return name[: -len(ending)]
    return strip_image_suffix(name)


class StoredSegmentation:
    """Another tool's stored output (e.g. TotalSegmentator) used as a :class:`Segmenter`.

    ``path`` is any stored segmentation :func:`~mtkd.data.stored_outputs.read_stored_map`
    reads (label map, ``.seg.nrrd``, probabilities, folder of ``<structure>.nii.gz`` masks);
    probabilities become the most probable label. ``labels`` names the label values; a
    ``.seg.nrrd`` or a mask folder may omit it. The map must lie on the image's grid.
    """

    def __init__(self, path: str | Path, labels: LabelTable | None = None, name: str | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise MTKDError("stored segmentation not found", self.path)
        if labels is None:
            labels = stored_label_table(self.path)
        if labels is None:
            raise MTKDError(
                "a stored label or probability map needs a label table (labels JSON) naming "
                "its values",
                self.path,
            )
        self.labels = labels
        self.name = name or _stored_name(self.path)
        self.parameters: int | None = None

    def predict(self, image: sitk.Image) -> StoredPrediction:
        """The stored map as a label map on ``image``'s grid."""
        array = read_stored_map(self.path, image, self.labels).as_labelmap(self.path)
        unknown = [v for v in label_values_in(array) if v != 0 and v not in self.labels]
        if unknown:  # a .seg.nrrd keeps its own values
            raise MTKDError(
                f"label values {unknown[:20]} are not in the label table given for this map",
                self.path,
            )
        return StoredPrediction(image_on_grid(array, image))


def image_on_grid(array: np.ndarray, grid: sitk.Image) -> sitk.Image:
    """The (z, y, x) ``array`` as an image with ``grid``'s origin, spacing and direction."""
    image = sitk.GetImageFromArray(array)
    image.SetOrigin(grid.GetOrigin())
    image.SetSpacing(grid.GetSpacing())
    image.SetDirection(grid.GetDirection())
    return image
