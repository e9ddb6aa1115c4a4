"""The paper's slice-level Dice beside the per-volume scores, from one prediction per case.

The thesis reported one Dice over its test *slices* (METHOD.md section 2): overlaps and sizes
pooled over every 2-D test slice. We report it for comparison, next to the per-volume Dice and
HD95 of :mod:`mtkd.infer.evaluate` (METHOD.md section 3, fix 6):

- **pooled slice Dice**: 2 * sum(|P & R|) / (sum(|P|) + sum(|R|)), the sums over every axial
  slice of every test volume. Pooling over slices is pooling over voxels, so it equals the
  Dice of all test voxels taken together (large volumes weigh more); it does not depend on
  which axis the slices are cut along;
- **mean slice Dice**: the mean of the per-slice Dice over the axial slices where the
  prediction or the reference holds the structure (a per-slice average, the other common
  reading of "slice Dice").

Both are computed on each CT's own grid. The paper's slices were resized to 256 x 256 first;
ratios of areas barely change under that resize.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from mtkd.data.datasets import DatasetIndex
from mtkd.errors import MTKDError
from mtkd.infer.evaluate import CaseScore, evaluate
from mtkd.infer.predictor import Predictor

__all__ = [
    "Evaluation",
    "SliceCounts",
    "axial_axis",
    "evaluate_with_slices",
    "mean_slice_dice",
    "pooled_slice_dice",
    "slice_counts",
]


@dataclass
class SliceCounts:
    """Per structure (rows 0..K-1) and axial slice (columns): |P & R|, |P| and |R| in voxels."""

    intersection: np.ndarray  # (K, S) int64
    predicted: np.ndarray  # (K, S)
    reference: np.ndarray  # (K, S)

    @classmethod
    def empty(cls, structures: int) -> SliceCounts:
        zeros = np.zeros((structures, 0), dtype=np.int64)
        return cls(zeros, zeros.copy(), zeros.copy())

    def extend(self, other: SliceCounts) -> SliceCounts:
        """These slices and ``other``'s (another volume) together."""
        return SliceCounts(
            *(
                np.concatenate([a, b], axis=1)
                for a, b in zip(
                    (self.intersection, self.predicted, self.reference),
                    (other.intersection, other.predicted, other.reference),
                    strict=True,
                )
            )
        )

    @property
    def slices(self) -> int:
        return int(self.intersection.shape[1])


def axial_axis(image: sitk.Image) -> int:
    """The axis of ``sitk.GetArrayFromImage(image)`` (z, y, x order) that runs closest to
    the patient's superior-inferior direction: slicing along it gives axial slices."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    voxel_axis = int(np.argmax(np.abs(direction[2])))  # column i: world direction of index i
    return 2 - voxel_axis


def slice_counts(
    prediction: np.ndarray, reference: np.ndarray, structures: int, axis: int = 0
) -> SliceCounts:
    """Counts of labels 1..``structures`` per slice along ``axis`` of two label maps."""
    if prediction.shape != reference.shape:
        raise MTKDError(f"label maps differ in shape: {prediction.shape} vs {reference.shape}")
    pred = np.moveaxis(prediction, axis, 0).reshape(prediction.shape[axis], -1)
    ref = np.moveaxis(reference, axis, 0).reshape(reference.shape[axis], -1)
    rows = [[], [], []]
    for value in range(1, structures + 1):
        p, r = pred == value, ref == value
        rows[0].append((p & r).sum(axis=1))
        rows[1].append(p.sum(axis=1))
        rows[2].append(r.sum(axis=1))
    return SliceCounts(*(np.asarray(row, dtype=np.int64).reshape(structures, -1) for row in rows))


def pooled_slice_dice(counts: SliceCounts) -> list[float]:
    """Per structure: 2 * sum |P & R| / (sum |P| + sum |R|) over all slices (NaN if both 0)."""
    total = counts.predicted.sum(axis=1) + counts.reference.sum(axis=1)
    overlap = counts.intersection.sum(axis=1)
    return [math.nan if t == 0 else 2.0 * float(o) / float(t) for o, t in zip(overlap, total)]


def mean_slice_dice(counts: SliceCounts) -> list[float]:
    """Per structure: the mean per-slice Dice over slices where P or R holds it (NaN if none)."""
    scores = []
    for k in range(counts.intersection.shape[0]):
        total = counts.predicted[k] + counts.reference[k]
        present = total > 0
        if not present.any():
            scores.append(math.nan)
            continue
        dice = 2.0 * counts.intersection[k][present] / total[present]
        scores.append(float(dice.mean()))
    return scores


@dataclass
class Evaluation:
    """Per-volume scores and the test set's slice counts of one model."""

    scores: list[CaseScore]
    counts: SliceCounts
    structures: list[str]
    seconds: list[float] = field(default_factory=list)

    def pooled(self) -> dict[str, float]:
        return dict(zip(self.structures, pooled_slice_dice(self.counts), strict=True))

    def mean_slice(self) -> dict[str, float]:
        return dict(zip(self.structures, mean_slice_dice(self.counts), strict=True))


def evaluate_with_slices(
    predictor: Predictor, dataset: DatasetIndex, case_ids: list[str]
) -> Evaluation:
    """Segment each case once; per-volume Dice and HD95 (mm) per structure, as
    :func:`mtkd.infer.evaluate.evaluate` gives them, plus the axial slice counts."""
    names = list(predictor.model.labels.names)
    result = Evaluation([], SliceCounts.empty(len(names)), names)

    def count_slices(_case_id: str, pred: np.ndarray, ref: np.ndarray, image: sitk.Image):
        result.counts = result.counts.extend(slice_counts(pred, ref, len(names), axial_axis(image)))

    result.scores = evaluate(predictor, dataset, case_ids, on_arrays=count_slices)
    seconds = {score.case_id: score.seconds for score in result.scores}
    result.seconds = [seconds[case_id] for case_id in case_ids]
    return result
