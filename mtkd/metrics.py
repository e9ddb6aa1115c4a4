"""Per-structure overlap and surface-distance metrics on label maps."""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance


def dice_per_structure(
    prediction: np.ndarray, reference: np.ndarray, num_structures: int
) -> list[float]:
    """Dice of labels 1..K between two label maps of one shape; NaN where both are empty."""
    scores = []
    for value in range(1, num_structures + 1):
        pred, ref = prediction == value, reference == value
        total = int(pred.sum()) + int(ref.sum())
        scores.append(math.nan if total == 0 else 2.0 * int((pred & ref).sum()) / total)
    return scores


def hd95_per_structure(
    prediction: np.ndarray,
    reference: np.ndarray,
    num_structures: int,
    spacing: tuple[float, ...],
) -> list[float]:
    """95th-percentile symmetric Hausdorff distance (mm) of labels 1..K.

    ``spacing`` matches the arrays' axis order. NaN where both maps lack the structure,
    infinity where exactly one has it.
    """
    distances = []
    for value in range(1, num_structures + 1):
        pred, ref = prediction == value, reference == value
        if not pred.any() and not ref.any():
            distances.append(math.nan)
        elif not pred.any() or not ref.any():
            distances.append(math.inf)
        else:
            as_batch = (torch.as_tensor(pred)[None, None], torch.as_tensor(ref)[None, None])
            value_mm = compute_hausdorff_distance(
                *as_batch, include_background=True, percentile=95, spacing=list(spacing)
            )
            distances.append(float(value_mm.item()))
    return distances


def nanmean(values: list[float]) -> float:
    """Mean of the finite values (NaN when there are none)."""
    finite = [v for v in values if not math.isnan(v) and not math.isinf(v)]
    return float(np.mean(finite)) if finite else math.nan
