"""Per-volume, per-structure Dice and HD95 (mm) of a model on labelled cases.

A structure missed entirely (or predicted where the reference has none) scores the penalty HD95
of :mod:`mtkd.metrics` (the image's diagonal in mm) and is counted: ``summarise`` gives the
``missed`` and ``spurious`` counts next to every mean HD95. A structure the case does not
annotate (:mod:`mtkd.data.partial_labels`) is not scored: outcome ``not annotated``, NaN scores,
left out of the means and of the counts.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from mtkd.data.datasets import Case, DatasetIndex
from mtkd.data.image_io import atomic_write_bytes, read_image, read_label
from mtkd.data.labels import check_label_map, remap_label_array
from mtkd.errors import MTKDError
from mtkd.infer.predictor import Predictor
from mtkd.metrics import (
    FOUND,
    NOT_ANNOTATED,
    PENALTY_NOTE,
    count_outcomes,
    dice_per_structure,
    format_missed,
    hd95_per_structure,
    nanmean,
    outcomes_per_structure,
)


@dataclass
class CaseScore:
    case_id: str
    structure: str
    dice: float
    hd95_mm: float
    seconds: float
    outcome: str = FOUND  # found, missed, spurious, absent or not annotated (mtkd.metrics)


def label_mapping_for(model_names: list[str], dataset: DatasetIndex) -> dict[int, int]:
    """Dataset label values -> the model's 1..K, matched by structure name."""
    by_name = {name: value for value, name in dataset.labels.items()}
    missing = [name for name in model_names if name not in by_name]
    if missing:
        raise MTKDError(
            f"the dataset has no structure named {', '.join(missing)} "
            f"(it has {', '.join(by_name)})",
            path=dataset.root,
        )
    return {by_name[name]: index for index, name in enumerate(model_names, start=1)}


# called with (case id, predicted labels (z, y, x), reference labels (z, y, x), image)
CaseArrays = Callable[[str, np.ndarray, np.ndarray, sitk.Image], None]


def score_case(
    predictor: Predictor,
    case: Case,
    dataset: DatasetIndex,
    mapping: dict[int, int],
    on_arrays: CaseArrays | None = None,
) -> list[CaseScore]:
    """Segment one case and compare it with its reference on the original grid; ``on_arrays``
    also sees the two label arrays (e.g. for slice-level metrics), without the structures the
    case does not annotate."""
    if case.label is None:
        raise MTKDError(f"case {case.case_id} has no reference label map", path=case.image)
    image = read_image(case.image)
    reference = read_label(case.label, reference=image)
    check_label_map(reference, dataset.labels, case.label)
    prediction = predictor.predict(image)
    ref = remap_label_array(sitk.GetArrayViewFromImage(reference), mapping)
    pred = sitk.GetArrayViewFromImage(prediction.labelmap)
    names = list(predictor.model.labels.names)
    spacing = tuple(reversed(image.GetSpacing()))  # array axes are (z, y, x)
    skip = [name for name in case.not_annotated if name in names]
    scores = score_arrays(case.case_id, pred, ref, names, spacing, prediction.seconds, skip)
    if on_arrays is not None:
        unknown = [names.index(name) + 1 for name in skip]
        pred = np.where(np.isin(pred, unknown), 0, pred) if unknown else np.asarray(pred)
        on_arrays(case.case_id, pred, np.asarray(ref), image)
    return scores


def score_arrays(
    case_id: str,
    prediction: np.ndarray,
    reference: np.ndarray,
    names: list[str],
    spacing: tuple[float, ...],
    seconds: float = 0.0,
    not_annotated: Collection[str] = (),
) -> list[CaseScore]:
    """Scores of structures 1..K (``names``) of two label maps of one shape; ``spacing`` in
    the arrays' axis order. The structures of ``not_annotated`` are not scored (NaN, outcome
    ``not annotated``)."""
    count = len(names)
    dice = dice_per_structure(prediction, reference, count)
    hd95 = hd95_per_structure(prediction, reference, count, spacing)
    outcomes = outcomes_per_structure(prediction, reference, count)
    return [
        CaseScore(case_id, name, math.nan, math.nan, seconds, NOT_ANNOTATED)
        if name in not_annotated
        else CaseScore(case_id, name, d, h, seconds, outcome)
        for name, d, h, outcome in zip(names, dice, hd95, outcomes, strict=True)
    ]


def evaluate(
    predictor: Predictor,
    dataset: DatasetIndex,
    case_ids: list[str],
    on_arrays: CaseArrays | None = None,
) -> list[CaseScore]:
    """Scores of every (case, structure) for the given cases (each segmented once)."""
    mapping = label_mapping_for(list(predictor.model.labels.names), dataset)
    cases = {case.case_id: case for case in dataset.cases}
    unknown = [case_id for case_id in case_ids if case_id not in cases]
    if unknown:
        raise MTKDError(f"unknown case id(s) {', '.join(unknown)}", path=dataset.root)
    scores: list[CaseScore] = []
    for case_id in case_ids:
        scores.extend(score_case(predictor, cases[case_id], dataset, mapping, on_arrays))
    return scores


def summarise(scores: list[CaseScore]) -> dict[str, dict[str, float]]:
    """Mean over volumes per structure (NaN-free means; missed structures count with the
    penalty HD95; structures a case does not annotate are left out), plus "mean" over
    structures. ``missed`` and ``spurious``: how many volumes (in "mean": structure-volumes)
    scored the penalty."""
    structures = list(dict.fromkeys(score.structure for score in scores))
    summary: dict[str, dict[str, float]] = {}
    for name in structures:
        own = [s for s in scores if s.structure == name]
        summary[name] = {
            "dice": nanmean([s.dice for s in own]),
            "hd95_mm": nanmean([s.hd95_mm for s in own]),
            **count_outcomes([s.outcome for s in own]),
        }
    summary["mean"] = {
        "dice": nanmean([v["dice"] for v in summary.values()]),
        "hd95_mm": nanmean([v["hd95_mm"] for v in summary.values()]),
        **count_outcomes([s.outcome for s in scores]),
    }
    return summary


def check_scores_csv(path: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """``path`` when per-volume scores can be written there, checked before any work:
    MTKDError naming it when it is a folder, when a folder above it is a file or cannot be
    written, or when it is one of ``inputs`` (files the command reads). Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise MTKDError("is a folder; give a file name for the scores, e.g. scores.csv", path)
    for given in inputs:
        if path.exists() and Path(given).exists() and path.resolve() == Path(given).resolve():
            raise MTKDError("is one of this command's inputs; write the scores elsewhere", path)
    folder = path.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise MTKDError(f"cannot write the scores here: {folder} is a file, not a folder", path)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise MTKDError(f"cannot write the scores here: no permission to write in {folder}", path)
    return path


def write_scores_csv(scores: list[CaseScore], path: str | Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["case", "structure", "dice", "hd95_mm", "seconds", "outcome"])
    for s in scores:
        writer.writerow(
            [
                s.case_id,
                s.structure,
                format_score(s.dice),
                format_score(s.hd95_mm),
                f"{s.seconds:.3f}",
                s.outcome,
            ]
        )
    atomic_write_bytes(Path(path), buffer.getvalue().encode())


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table with aligned columns."""
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def summary_table(summary: dict[str, dict[str, float]]) -> str:
    """Dice, HD95 and the missed count per structure and for the mean, then what "missed"
    means."""
    rows = [
        [
            name,
            format_score(v["dice"]),
            format_score(v["hd95_mm"]),
            format_missed(int(v.get("missed", 0)), int(v.get("spurious", 0))),
        ]
        for name, v in summary.items()
    ]
    table = format_table(["structure", "Dice", "HD95 (mm)", "missed"], rows)
    return table + "\n" + PENALTY_NOTE


def format_score(value: float) -> str:
    """A score for tables: three decimals, "n/a" for NaN, "inf" for infinity."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.1f}"


__all__ = [
    "CaseScore",
    "check_scores_csv",
    "evaluate",
    "score_arrays",
    "summarise",
    "summary_table",
    "write_scores_csv",
]
