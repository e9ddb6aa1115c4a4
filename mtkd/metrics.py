"""Per-structure overlap and surface-distance metrics on label maps.

A structure that one map has and the other lacks entirely has no surface distance. Leaving it
out of a mean would let a model that misses more structures score a better mean HD95, so it
gets a penalty instead: the diagonal of the image's box in mm, ``sqrt(sum((size_i *
spacing_i)^2))``, which is larger than any distance between two voxels of the image, so a miss
always scores worse than any detection. Both directions get it, as Dice gives both 0:

- ``missed``: the reference has the structure, the prediction has none of it;
- ``spurious``: the prediction has it where the reference has none (a false detection).

A structure absent from both maps has no score (NaN) and is left out of means. So is a
structure the reference case does not annotate (``not annotated``: nobody drew it, so a
prediction there is neither a miss nor a false detection); it is counted as neither.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

FOUND, MISSED, SPURIOUS, ABSENT = "found", "missed", "spurious", "absent"
NOT_ANNOTATED = "not annotated"
# printed under tables that show a mean HD95 with a "missed" column
PENALTY_NOTE = (
    "missed: structures a model left empty (+spurious: labelled where the reference has none); "
    "each counts in HD95 as the image's diagonal in mm"
)


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


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Diagonal (mm) of the box the image's voxels cover; ``spacing`` in ``shape``'s axis
    order. The HD95 of a missed or spurious structure."""
    if len(shape) != len(spacing):
        raise ValueError(f"shape {tuple(shape)} and spacing {tuple(spacing)} differ in length")
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing, strict=True))))


def outcomes_per_structure(
    prediction: np.ndarray, reference: np.ndarray, num_structures: int
) -> list[str]:
    """For labels 1..K: ``found`` (in both maps), ``missed`` (reference only), ``spurious``
    (prediction only) or ``absent`` (in neither)."""
    outcomes = []
    for value in range(1, num_structures + 1):
        in_pred, in_ref = bool((prediction == value).any()), bool((reference == value).any())
        if in_pred and in_ref:
            outcomes.append(FOUND)
        elif in_ref:
            outcomes.append(MISSED)
        elif in_pred:
            outcomes.append(SPURIOUS)
        else:
            outcomes.append(ABSENT)
    return outcomes


def _edge_options() -> dict[str, bool]:
    """Keyword arguments for ``get_mask_edges``: MONAI 1.4 warns unless
    ``always_return_as_numpy`` is given (its default was to change in 1.5); 1.5 deprecates the
    argument itself (removed in 1.7) and warns when it is given. For NumPy input both return
    NumPy arrays. (MONAI's own ``compute_hausdorff_distance`` passes it, and warns, on 1.5+.)"""
    import monai
    from monai.utils import version_geq

    return {} if version_geq(monai.__version__, "1.5") else {"always_return_as_numpy": True}


def _hd95_mm(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Symmetric 95th-percentile surface distance (mm) of two non-empty boolean masks.

    MONAI's edge and surface-distance helpers on NumPy arrays (NumPy in, NumPy out), called
    as each supported MONAI version asks, so that none warns (see :func:`_edge_options`).
    """
    from monai.metrics.utils import get_mask_edges, get_surface_distance

    edges_pred, edges_ref = get_mask_edges(pred, ref, crop=True, **_edge_options())[:2]
    to_ref = np.asarray(get_surface_distance(edges_pred, edges_ref, "euclidean", spacing))
    to_pred = np.asarray(get_surface_distance(edges_ref, edges_pred, "euclidean", spacing))
    return float(max(np.percentile(to_ref, 95), np.percentile(to_pred, 95)))


def hd95_per_structure(
    prediction: np.ndarray,
    reference: np.ndarray,
    num_structures: int,
    spacing: tuple[float, ...],
) -> list[float]:
    """95th-percentile symmetric Hausdorff distance (mm) of labels 1..K.

    ``spacing`` matches the arrays' axis order. NaN where both maps lack the structure; the
    image's diagonal (:func:`image_diagonal_mm`) where exactly one has it (see the module
    docstring).
    """
    if prediction.shape != reference.shape:
        raise ValueError(f"label maps differ in shape: {prediction.shape} and {reference.shape}")
    spacing = tuple(float(s) for s in spacing)
    penalty = image_diagonal_mm(prediction.shape, spacing)
    distances = []
    for value, outcome in enumerate(
        outcomes_per_structure(prediction, reference, num_structures), start=1
    ):
        if outcome == ABSENT:
            distances.append(math.nan)
        elif outcome != FOUND:
            distances.append(penalty)
        else:
            distances.append(_hd95_mm(prediction == value, reference == value, spacing))
    return distances


def count_outcomes(outcomes: Sequence[str]) -> dict[str, int]:
    """How many of ``outcomes`` are ``missed`` and ``spurious`` (each scored with the
    penalty distance)."""
    return {name: sum(o == name for o in outcomes) for name in (MISSED, SPURIOUS)}


def format_missed(missed: int, spurious: int = 0) -> str:
    """The count shown next to a mean HD95: ``"2"``, or ``"2 +1 spurious"``."""
    return f"{missed}" if not spurious else f"{missed} +{spurious} spurious"


def nanmean(values: list[float]) -> float:
    """Mean of the finite values (NaN when there are none)."""
    finite = [v for v in values if not math.isnan(v) and not math.isinf(v)]
    return float(np.mean(finite)) if finite else math.nan
