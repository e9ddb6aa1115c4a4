"""Segment CT images with an exported model, on the input's exact grid."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from mtkd.data.preprocess import build_transforms, invert_to_original, to_metatensor, to_sitk
from mtkd.infer.inference import predict_volume, probabilities_to_labels
from mtkd.infer.model_io import LoadedModel

# Above this many probability voxels (channels x voxels of the original grid) the label map,
# not the probabilities, is mapped back (nearest neighbour) to bound memory.
_MAX_PROBABILITY_VOXELS = 1 << 28


@dataclass
class Prediction:
    """A label map on the input image's grid (values 1..K as in ``model.labels``)."""

    labelmap: sitk.Image
    seconds: float


class Predictor:
    """Keeps one model loaded and segments any number of images with it."""

    def __init__(self, model: LoadedModel, device: torch.device | str = "cpu"):
        self.model = model
        self.device = torch.device(device)
        self.model.network.to(self.device).eval()
        self.transforms = build_transforms(model.prep, with_label=False)

    def predict(self, image: sitk.Image) -> Prediction:
        """Segment a CT (any size, spacing and orientation) -> label map on its grid."""
        started = time.perf_counter()
        data = self.transforms({"image": to_metatensor(image)})
        preprocessed = data["image"]
        probabilities = predict_volume(
            self.model.network,
            preprocessed.as_tensor(),
            self.model.prep,
            self.model.activation,
            self.device,
        )
        original_voxels = int(np.prod(image.GetSize())) * probabilities.shape[0]
        if original_voxels <= _MAX_PROBABILITY_VOXELS:
            back = invert_to_original(probabilities, preprocessed, self.transforms, nearest=False)
            labels = probabilities_to_labels(back, self.model.activation)
        else:
            labels = probabilities_to_labels(probabilities, self.model.activation)[None]
            labels = invert_to_original(
                labels.float(), preprocessed, self.transforms, nearest=True
            )[0]
        array = labels.round().to(torch.uint8 if len(self.model.labels) < 256 else torch.int16)
        labelmap = to_sitk(array.numpy(), image)
        return Prediction(labelmap, time.perf_counter() - started)
