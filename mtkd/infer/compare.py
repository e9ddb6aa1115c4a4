"""Teacher versus student on one CT: agreement, agreement with a reference, cost of each.

Structures are matched by name. Per common structure: Dice and HD95 (mm) teacher-student and,
with a reference, teacher-reference and student-reference; volumes (ml) of each map and of the
voxels only the teacher or only the student labels. Per model: inference seconds, peak memory
and parameter count (None where unknown, e.g. for a stored segmentation of another tool).

The segmenters compared are in :mod:`mtkd.infer.segmenters`; the printed summary is
:mod:`mtkd.infer.comparison_table`, the files written :mod:`mtkd.infer.comparison_files`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from mtkd.data.image_io import check_same_grid
from mtkd.data.labels import LabelTable, label_values_in, remap_label_array
from mtkd.errors import MTKDError
from mtkd.infer.segmenters import Segmenter, image_on_grid
from mtkd.metrics import (
    count_outcomes,
    dice_per_structure,
    hd95_per_structure,
    image_diagonal_mm,
    nanmean,
    outcomes_per_structure,
)

__all__ = [
    "REFERENCE_FIELDS",
    "ComparisonResult",
    "ModelRun",
    "StructureRow",
    "compare",
    "shorten_names",
]

_NAMES_SHOWN = 12  # unmatched structure names listed in the printed summary


@dataclass
class ModelRun:
    """What running one segmenter cost."""

    name: str
    seconds: float
    peak_memory_bytes: int | None
    parameters: int | None
    plan: str | None
    structures: list[str]


@dataclass
class StructureRow:
    """Scores of one common structure (NaN: not defined; HD95 is the penalty distance where
    one map of the pair lacks the structure)."""

    structure: str
    dice_teacher_student: float
    hd95_teacher_student_mm: float
    dice_teacher_reference: float | None
    hd95_teacher_reference_mm: float | None
    dice_student_reference: float | None
    hd95_student_reference_mm: float | None
    volume_teacher_ml: float
    volume_student_ml: float
    volume_reference_ml: float | None
    teacher_only_ml: float
    student_only_ml: float


REFERENCE_FIELDS = (
    "dice_teacher_reference",
    "hd95_teacher_reference_mm",
    "dice_student_reference",
    "hd95_student_reference_mm",
    "volume_reference_ml",
)


@dataclass
class ComparisonResult:
    """Scores, costs and the label maps (values 1..K = ``labels``) on the image's grid.

    ``teacher_only`` / ``student_only``: value ``k`` where only that model labels structure ``k``.
    """

    labels: LabelTable
    rows: list[StructureRow]
    teacher: ModelRun
    student: ModelRun
    teacher_labelmap: sitk.Image
    student_labelmap: sitk.Image
    teacher_only: sitk.Image
    student_only: sitk.Image
    reference_labelmap: sitk.Image | None = None
    only_in_teacher: list[str] = field(default_factory=list)
    only_in_student: list[str] = field(default_factory=list)
    missing_from_reference: list[str] = field(default_factory=list)
    # per pair ("teacher_student", ...): {"missed": n, "spurious": n}, scored with the penalty
    missed: dict[str, dict[str, int]] = field(default_factory=dict)
    hd95_penalty_mm: float = math.nan

    @property
    def has_reference(self) -> bool:
        return self.reference_labelmap is not None

    def mean(self) -> dict[str, float]:
        """Mean of each score over the structures (finite values only; NaN if none)."""
        names = ["dice_teacher_student", "hd95_teacher_student_mm"]
        if self.has_reference:
            names += list(REFERENCE_FIELDS[:4])
        return {name: nanmean([getattr(row, name) for row in self.rows]) for name in names}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (NaN and infinity as None)."""
        return _json_ready(
            {
                "format": "mtkd-comparison",
                "format_version": 1,
                "teacher": asdict(self.teacher),
                "student": asdict(self.student),
                "reference": (
                    {"missing_structures": self.missing_from_reference}
                    if self.has_reference
                    else None
                ),
                "structures": [asdict(row) for row in self.rows],
                "mean": self.mean(),
                "missed": self.missed,
                "hd95_penalty_mm": self.hd95_penalty_mm,
                "unmatched": {
                    "only_in_teacher": self.only_in_teacher,
                    "only_in_student": self.only_in_student,
                },
            }
        )


def _json_ready(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value


def _prediction_array(
    segmenter: Segmenter, image: sitk.Image, role: str
) -> tuple[np.ndarray, ModelRun]:
    prediction = segmenter.predict(image)
    labelmap = prediction.labelmap
    source = getattr(segmenter, "path", None) or f"{role} {segmenter.name}"
    check_same_grid(labelmap, image, source)
    peak = getattr(prediction, "peak_memory_bytes", None)
    run = ModelRun(
        name=segmenter.name,
        seconds=float(prediction.seconds),
        peak_memory_bytes=None if peak is None else int(peak),
        parameters=segmenter.parameters,
        plan=getattr(prediction, "plan", None),
        structures=list(segmenter.labels.names),
    )
    return sitk.GetArrayFromImage(labelmap), run


def _mapping(table: LabelTable, names: list[str]) -> dict[int, int]:
    """Values of ``table`` -> 1..K positions in ``names`` (structures not in ``names`` -> 0)."""
    position = {name: index for index, name in enumerate(names, start=1)}
    return {value: position[name] for value, name in table.items() if name in position}


def compare(
    teacher: Segmenter,
    student: Segmenter,
    image: sitk.Image,
    reference: sitk.Image | None = None,
    reference_labels: LabelTable | None = None,
    *,
    reference_path: str | Path | None = None,
) -> ComparisonResult:
    """Run both segmenters on ``image`` and score them against each other (and ``reference``).

    Structures are matched by name, in the student's order. ``reference_labels`` defaults to
    the student's table; ``reference_path`` names the reference file in error messages.
    """
    common = _common_structures(teacher, student)
    if reference is not None:
        reference_labels = reference_labels or LabelTable(student.labels.items())
        source = reference_path or "reference label map"
        _check_reference(reference, reference_labels, image, source)
    teacher_array, teacher_run = _prediction_array(teacher, image, "teacher")
    student_array, student_run = _prediction_array(student, image, "student")
    _check_known_values("teacher", teacher, teacher_array)
    _check_known_values("student", student, student_array)
    t = remap_label_array(teacher_array, _mapping(teacher.labels, common))
    s = remap_label_array(student_array, _mapping(student.labels, common))
    grid = _ScoringGrid.of(image, len(common))
    differ = t != s
    teacher_only = np.where(differ, t, 0).astype(t.dtype)
    student_only = np.where(differ, s, 0).astype(s.dtype)
    columns = _teacher_student_columns(t, s, teacher_only, student_only, grid)
    missed = {"teacher_student": count_outcomes(outcomes_per_structure(s, t, grid.count))}
    missing: list[str] = []
    r = None
    if reference is not None:
        missing = [name for name in common if name not in set(reference_labels.names)]
        r = remap_label_array(
            sitk.GetArrayViewFromImage(reference), _mapping(reference_labels, common)
        )
        absent = [name in missing for name in common]
        columns.update(_reference_columns(t, s, r, absent, grid))
        missed.update(_reference_missed(t, s, r, absent, grid.count))
    rows = [
        StructureRow(structure=name, **{key: values[i] for key, values in columns.items()})
        for i, name in enumerate(common)
    ]
    return ComparisonResult(
        labels=LabelTable(enumerate(common, start=1)),
        rows=rows,
        teacher=teacher_run,
        student=student_run,
        teacher_labelmap=image_on_grid(t, image),
        student_labelmap=image_on_grid(s, image),
        teacher_only=image_on_grid(teacher_only, image),
        student_only=image_on_grid(student_only, image),
        reference_labelmap=None if r is None else image_on_grid(r, image),
        only_in_teacher=[name for name in teacher.labels.names if name not in set(common)],
        only_in_student=[name for name in student.labels.names if name not in set(common)],
        missing_from_reference=missing,
        missed=missed,
        hd95_penalty_mm=image_diagonal_mm(t.shape, grid.spacing),
    )


def _common_structures(teacher: Segmenter, student: Segmenter) -> list[str]:
    """The structure names both segmenters label, in the student's order (MTKDError if none)."""
    teacher_names, student_names = teacher.labels.names, student.labels.names
    common = [name for name in student_names if name in set(teacher_names)]
    if not common:
        raise MTKDError(
            f"teacher '{teacher.name}' and student '{student.name}' share no structure name "
            f"(teacher: {shorten_names(teacher_names)}; student: {shorten_names(student_names)})"
        )
    return common


def _check_reference(
    reference: sitk.Image, labels: LabelTable, image: sitk.Image, source: str | Path
) -> None:
    """MTKDError unless ``reference`` lies on ``image``'s grid with every value in ``labels``."""
    check_same_grid(reference, image, source)
    unknown = [v for v in label_values_in(reference) if v != 0 and v not in labels]
    if unknown:
        raise MTKDError(
            f"reference label values {unknown[:20]} are not in its label table "
            f"({shorten_names([f'{v}={n}' for v, n in labels.items()])})",
            source,
        )


def _check_known_values(role: str, segmenter: Segmenter, array: np.ndarray) -> None:
    """MTKDError when ``segmenter``'s prediction ``array`` has a value its table lacks."""
    unknown = [v for v in label_values_in(array) if v != 0 and v not in segmenter.labels]
    if unknown:
        raise MTKDError(
            f"{role} '{segmenter.name}' produced label values {unknown[:20]} that are not "
            "in its label table"
        )


@dataclass(frozen=True)
class _ScoringGrid:
    """What the scores need of the image: its spacing (mm) along the array axes (z, y, x),
    one voxel's volume (ml) and the number ``count`` of common structures."""

    spacing: tuple[float, float, float]
    voxel_ml: float
    count: int

    @classmethod
    def of(cls, image: sitk.Image, count: int) -> _ScoringGrid:
        spacing = tuple(reversed(image.GetSpacing()))  # array axes are (z, y, x)
        return cls(spacing, float(np.prod(image.GetSpacing())) / 1000.0, count)

    def volumes(self, array: np.ndarray) -> list[float]:
        """Volume (ml) of structures 1..count in the (z, y, x) label ``array``."""
        counts = np.bincount(array.ravel(), minlength=self.count + 1)[1 : self.count + 1]
        return [int(n) * self.voxel_ml for n in counts]


def _teacher_student_columns(
    t: np.ndarray,
    s: np.ndarray,
    teacher_only: np.ndarray,
    student_only: np.ndarray,
    grid: _ScoringGrid,
) -> dict[str, list]:
    """Per :class:`StructureRow` field, its value per structure (reference fields None)."""
    count, spacing = grid.count, grid.spacing
    columns: dict[str, list] = {
        "dice_teacher_student": dice_per_structure(t, s, count),
        "hd95_teacher_student_mm": hd95_per_structure(t, s, count, spacing),
        "volume_teacher_ml": grid.volumes(t),
        "volume_student_ml": grid.volumes(s),
        "teacher_only_ml": grid.volumes(teacher_only),
        "student_only_ml": grid.volumes(student_only),
    }
    columns.update({name: [None] * count for name in REFERENCE_FIELDS})
    return columns


def _reference_columns(
    t: np.ndarray, s: np.ndarray, r: np.ndarray, absent: list[bool], grid: _ScoringGrid
) -> dict[str, list]:
    """The reference fields per structure: scores against ``r``, NaN where ``absent`` from
    the reference's label table."""
    count, spacing = grid.count, grid.spacing
    scores = {
        "dice_teacher_reference": dice_per_structure(t, r, count),
        "hd95_teacher_reference_mm": hd95_per_structure(t, r, count, spacing),
        "dice_student_reference": dice_per_structure(s, r, count),
        "hd95_student_reference_mm": hd95_per_structure(s, r, count, spacing),
        "volume_reference_ml": grid.volumes(r),
    }
    return {
        name: [math.nan if gone else v for v, gone in zip(values, absent)]
        for name, values in scores.items()
    }


def _reference_missed(
    t: np.ndarray, s: np.ndarray, r: np.ndarray, absent: list[bool], count: int
) -> dict[str, dict[str, int]]:
    """Missed and spurious structures of each model against ``r`` (those ``absent`` from the
    reference's table left out)."""
    missed = {}
    for pair, array in (("teacher_reference", t), ("student_reference", s)):
        outcomes = outcomes_per_structure(array, r, count)
        missed[pair] = count_outcomes([o for o, gone in zip(outcomes, absent) if not gone])
    return missed


def shorten_names(names: list[str], limit: int = _NAMES_SHOWN) -> str:
    """``names`` joined by commas, at most ``limit`` of them, then how many more."""
    if not names:
        return "none"
    more = f" ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
