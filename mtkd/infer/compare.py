"""Teacher versus student on one CT: agreement, agreement with a reference, cost of each.

Structures are matched by name. Per common structure: Dice and HD95 (mm) teacher-student and,
with a reference, teacher-reference and student-reference; volumes (ml) of each map and of the
voxels only the teacher or only the student labels. Per model: inference seconds, peak memory
and parameter count (None where unknown, e.g. for a stored segmentation of another tool).

Outputs of :func:`write_comparison` in one folder:

- ``comparison.json``: everything above; NaN (structure absent from both maps, or from the
  reference's label table) is written as ``null``. A structure that one map of a pair has and
  the other lacks entirely scores the penalty HD95 of :mod:`mtkd.metrics` (the image's diagonal
  in mm, ``hd95_penalty_mm``); ``missed`` counts them per pair (the first map of the pair is
  the reference side: ``missed`` = only in the first, ``spurious`` = only in the second);
- ``comparison.csv``: one row per structure (``nan``/``inf`` spelled out, reference columns empty
  without a reference);
- ``disagreement.seg.nrrd``: a two-layer Slicer segmentation, ``<structure> teacher only`` in
  layer 0 and ``<structure> student only`` in layer 1 (they overlap where the two models give a
  voxel different structures); every structure's two segments are listed, even when empty;
- ``comparison.png`` (optional): see :mod:`mtkd.infer.picture`.
"""

from __future__ import annotations

import colorsys
import csv
import gzip
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import SimpleITK as sitk
from torch import nn

from mtkd.data.atomic import atomic_write_bytes
from mtkd.data.image_io import check_same_grid, strip_image_suffix
from mtkd.data.labels import LabelTable, label_values_in, remap_label_array
from mtkd.data.segnrrd import segment_header
from mtkd.data.stored_outputs import read_stored_map, stored_label_table
from mtkd.errors import MTKDError
from mtkd.infer.evaluate import format_score, format_table
from mtkd.infer.picture import structure_colors
from mtkd.metrics import (
    PENALTY_NOTE,
    count_outcomes,
    dice_per_structure,
    format_missed,
    hd95_per_structure,
    image_diagonal_mm,
    nanmean,
    outcomes_per_structure,
)
from mtkd.models import count_parameters

__all__ = [
    "ComparisonResult",
    "ModelRun",
    "ModelSegmenter",
    "Segmenter",
    "StoredPrediction",
    "StoredSegmentation",
    "StructureRow",
    "compare",
    "comparison_paths",
    "format_comparison",
    "write_comparison",
    "write_disagreement",
]

_NAMES_SHOWN = 12  # unmatched structure names listed in the printed summary


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
        return StoredPrediction(_on_grid(array, image))


def _on_grid(array: np.ndarray, grid: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetOrigin(grid.GetOrigin())
    image.SetSpacing(grid.GetSpacing())
    image.SetDirection(grid.GetDirection())
    return image


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


_REFERENCE_FIELDS = (
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
            names += list(_REFERENCE_FIELDS[:4])
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
    teacher_names, student_names = teacher.labels.names, student.labels.names
    common = [name for name in student_names if name in set(teacher_names)]
    if not common:
        raise MTKDError(
            f"teacher '{teacher.name}' and student '{student.name}' share no structure name "
            f"(teacher: {_shorten(teacher_names)}; student: {_shorten(student_names)})"
        )
    if reference is not None:
        reference_labels = reference_labels or LabelTable(student.labels.items())
        source = reference_path or "reference label map"
        check_same_grid(reference, image, source)
        unknown = [v for v in label_values_in(reference) if v != 0 and v not in reference_labels]
        if unknown:
            raise MTKDError(
                f"reference label values {unknown[:20]} are not in its label table "
                f"({_shorten([f'{v}={n}' for v, n in reference_labels.items()])})",
                source,
            )
    teacher_array, teacher_run = _prediction_array(teacher, image, "teacher")
    student_array, student_run = _prediction_array(student, image, "student")
    for role, segmenter, array in (
        ("teacher", teacher, teacher_array),
        ("student", student, student_array),
    ):
        unknown = [v for v in label_values_in(array) if v != 0 and v not in segmenter.labels]
        if unknown:
            raise MTKDError(
                f"{role} '{segmenter.name}' produced label values {unknown[:20]} that are not "
                "in its label table"
            )
    table = LabelTable(enumerate(common, start=1))
    count = len(common)
    t = remap_label_array(teacher_array, _mapping(teacher.labels, common))
    s = remap_label_array(student_array, _mapping(student.labels, common))
    spacing = tuple(reversed(image.GetSpacing()))  # array axes are (z, y, x)
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0

    def volumes(array: np.ndarray) -> list[float]:
        counts = np.bincount(array.ravel(), minlength=count + 1)[1 : count + 1]
        return [int(n) * voxel_ml for n in counts]

    differ = t != s
    teacher_only = np.where(differ, t, 0).astype(t.dtype)
    student_only = np.where(differ, s, 0).astype(s.dtype)
    columns: dict[str, list] = {
        "dice_teacher_student": dice_per_structure(t, s, count),
        "hd95_teacher_student_mm": hd95_per_structure(t, s, count, spacing),
        "volume_teacher_ml": volumes(t),
        "volume_student_ml": volumes(s),
        "teacher_only_ml": volumes(teacher_only),
        "student_only_ml": volumes(student_only),
    }
    columns.update({name: [None] * count for name in _REFERENCE_FIELDS})
    missed = {"teacher_student": count_outcomes(outcomes_per_structure(s, t, count))}
    missing: list[str] = []
    r = None
    if reference is not None:
        assert reference_labels is not None
        missing = [name for name in common if name not in set(reference_labels.names)]
        r = remap_label_array(
            sitk.GetArrayViewFromImage(reference), _mapping(reference_labels, common)
        )
        absent = [name in missing for name in common]
        scores = {
            "dice_teacher_reference": dice_per_structure(t, r, count),
            "hd95_teacher_reference_mm": hd95_per_structure(t, r, count, spacing),
            "dice_student_reference": dice_per_structure(s, r, count),
            "hd95_student_reference_mm": hd95_per_structure(s, r, count, spacing),
            "volume_reference_ml": volumes(r),
        }
        for name, values in scores.items():
            columns[name] = [math.nan if gone else v for v, gone in zip(values, absent)]
        for pair, array in (("teacher_reference", t), ("student_reference", s)):
            outcomes = outcomes_per_structure(array, r, count)
            missed[pair] = count_outcomes([o for o, gone in zip(outcomes, absent) if not gone])
    rows = [
        StructureRow(structure=name, **{key: values[i] for key, values in columns.items()})
        for i, name in enumerate(common)
    ]
    return ComparisonResult(
        labels=table,
        rows=rows,
        teacher=teacher_run,
        student=student_run,
        teacher_labelmap=_on_grid(t, image),
        student_labelmap=_on_grid(s, image),
        teacher_only=_on_grid(teacher_only, image),
        student_only=_on_grid(student_only, image),
        reference_labelmap=None if r is None else _on_grid(r, image),
        only_in_teacher=[name for name in teacher_names if name not in set(common)],
        only_in_student=[name for name in student_names if name not in set(common)],
        missing_from_reference=missing,
        missed=missed,
        hd95_penalty_mm=image_diagonal_mm(t.shape, spacing),
    )


def _shorten(names: list[str], limit: int = _NAMES_SHOWN) -> str:
    if not names:
        return "none"
    more = f" ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _format_bytes(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f} MiB"


def _format_volume(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.1f}"


def format_comparison(result: ComparisonResult) -> str:
    """Printable tables: cost per model, scores per structure, unmatched structures."""
    models = format_table(
        ["role", "name", "seconds", "peak memory", "parameters", "plan"],
        [
            [
                role,
                run.name,
                f"{run.seconds:.2f}",
                _format_bytes(run.peak_memory_bytes),
                "n/a" if run.parameters is None else f"{run.parameters:,}",
                run.plan or "",
            ]
            for role, run in (("teacher", result.teacher), ("student", result.student))
        ],
    )
    header = ["structure", "Dice T-S", "HD95 T-S (mm)"]
    fields = ["dice_teacher_student", "hd95_teacher_student_mm"]
    volume_header = ["T (ml)", "S (ml)", "T only (ml)", "S only (ml)"]
    volume_fields = ["volume_teacher_ml", "volume_student_ml", "teacher_only_ml", "student_only_ml"]
    if result.has_reference:
        header += ["Dice T-R", "HD95 T-R (mm)", "Dice S-R", "HD95 S-R (mm)"]
        fields += list(_REFERENCE_FIELDS[:4])
        volume_header.insert(2, "R (ml)")
        volume_fields.insert(2, "volume_reference_ml")
    header += volume_header
    rows = [
        [row.structure]
        + [format_score(getattr(row, name)) for name in fields]
        + [_format_volume(getattr(row, name)) for name in volume_fields]
        for row in result.rows
    ]
    mean = result.mean()
    rows.append(
        ["mean"] + [format_score(mean[name]) for name in fields] + [""] * len(volume_fields)
    )
    rows.append(
        ["missed"]
        + [_missed_cell(result.missed, name) for name in fields]
        + [""] * len(volume_fields)
    )
    lines = [models, "", format_table(header, rows), _penalty_line(result)]
    notes = [
        ("only in the teacher", result.only_in_teacher),
        ("only in the student", result.only_in_student),
    ]
    if result.has_reference:
        notes.append(("not in the reference", result.missing_from_reference))
    lines += [f"{label} ({len(names)}): {_shorten(names)}" for label, names in notes if names]
    return "\n".join(lines)


def _missed_cell(missed: dict[str, dict[str, int]], field_name: str) -> str:
    """The missed count under a mean HD95 column (empty under the Dice columns)."""
    if not field_name.startswith("hd95_"):
        return ""
    pair = field_name.removeprefix("hd95_").removesuffix("_mm")
    counts = missed.get(pair, {})
    return format_missed(counts.get("missed", 0), counts.get("spurious", 0))


def _penalty_line(result: ComparisonResult) -> str:
    """What "missed" means here, with this image's penalty distance."""
    return (
        f"{PENALTY_NOTE} ({result.hd95_penalty_mm:.1f} mm for this image); "
        "in T-S the teacher stands for the reference"
    )


def _csv_number(value: float | None) -> str:
    if value is None:
        return ""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf"
    return f"{value:.10g}"


def _comparison_csv(result: ComparisonResult) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    names = [f.name for f in StructureRow.__dataclass_fields__.values()]
    writer.writerow(names)
    for row in result.rows:
        values = asdict(row)
        writer.writerow([row.structure] + [_csv_number(values[name]) for name in names[1:]])
    return buffer.getvalue().encode()


def disagreement_colors(count: int) -> list[tuple[float, float, float]]:
    """Colours of (teacher only, student only) for structure 1..K: the structure's hue,
    saturated for the teacher and pale for the student."""
    colors = []
    for red, green, blue in structure_colors(count):
        hue, _, _ = colorsys.rgb_to_hsv(red, green, blue)
        colors.append(colorsys.hsv_to_rgb(hue, 0.9, 0.85))
        colors.append(colorsys.hsv_to_rgb(hue, 0.35, 1.0))
    return colors


def _vector(values: Any) -> str:
    return "(" + ",".join(f"{float(v):.17g}" for v in values) + ")"


def write_disagreement(
    teacher_only: sitk.Image, student_only: sitk.Image, names: list[str], path: str | Path
) -> None:
    """Two-layer ``.seg.nrrd``: ``<name> teacher only`` (layer 0, value 2k-1) and
    ``<name> student only`` (layer 1, value 2k) for structure ``k`` of both maps."""
    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        raise MTKDError("segmentation file name must end with .seg.nrrd", path)
    check_same_grid(student_only, teacher_only, path)
    count = len(names)
    segment_names = [f"{name} {who} only" for name in names for who in ("teacher", "student")]
    table = LabelTable(enumerate(segment_names, start=1))
    dtype = np.uint8 if 2 * count <= 255 else np.uint16
    t = sitk.GetArrayViewFromImage(teacher_only).astype(np.int64)
    s = sitk.GetArrayViewFromImage(student_only).astype(np.int64)
    layers = np.stack([np.where(t > 0, 2 * t - 1, 0), np.where(s > 0, 2 * s, 0)], axis=-1)
    voxels = np.ascontiguousarray(layers.astype(dtype))  # (z, y, x, layer): layer fastest
    colors = dict(zip(segment_names, disagreement_colors(count)))
    header = segment_header(table, teacher_only.GetSize(), bool(voxels.any()), colors)
    for index in range(1, 2 * count, 2):
        header[f"Segment{index}_Layer"] = "1"
    direction = np.array(teacher_only.GetDirection()).reshape(3, 3)
    axes = direction * np.array(teacher_only.GetSpacing())  # column j: axis j in mm
    lines = [
        "NRRD0004",
        f"type: {'unsigned char' if dtype == np.uint8 else 'unsigned short'}",
        "dimension: 4",
        "space: left-posterior-superior",
        "sizes: 2 " + " ".join(str(n) for n in teacher_only.GetSize()),
        "space directions: none " + " ".join(_vector(axes[:, j]) for j in range(3)),
        "kinds: list domain domain domain",
        "endian: little",
        "encoding: gzip",
        "space origin: " + _vector(teacher_only.GetOrigin()),
    ]
    lines += [f"{key}:={text}" for key, text in header.items()]
    data = voxels.astype(voxels.dtype.newbyteorder("<"), copy=False).tobytes()
    body = ("\n".join(lines) + "\n\n").encode() + gzip.compress(data, compresslevel=6)
    atomic_write_bytes(path, body)


def comparison_paths(
    out_dir: str | Path, png: bool = False, segmentations: bool = False
) -> dict[str, Path]:
    """The files a comparison writes in ``out_dir``: ``json``, ``csv``, ``disagreement``,
    with ``png`` the picture, with ``segmentations`` both models' ``teacher``/``student``
    segmentations (``.seg.nrrd``)."""
    out_dir = Path(out_dir)
    paths = {
        "json": out_dir / "comparison.json",
        "csv": out_dir / "comparison.csv",
        "disagreement": out_dir / "disagreement.seg.nrrd",
    }
    if png:
        paths["png"] = out_dir / "comparison.png"
    if segmentations:
        paths["teacher"] = out_dir / "teacher.seg.nrrd"
        paths["student"] = out_dir / "student.seg.nrrd"
    return paths


def write_comparison(
    result: ComparisonResult, out_dir: str | Path, image: sitk.Image, png: bool = False
) -> dict[str, Path]:
    """Write comparison.json, comparison.csv, disagreement.seg.nrrd (and comparison.png);
    see :func:`comparison_paths`."""
    paths = comparison_paths(out_dir, png)
    text = json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(paths["json"], text.encode())
    atomic_write_bytes(paths["csv"], _comparison_csv(result))
    write_disagreement(
        result.teacher_only, result.student_only, result.labels.names, paths["disagreement"]
    )
    if png:
        from mtkd.infer.picture import write_contour_png

        paths["png"] = write_contour_png(
            image,
            result.teacher_labelmap,
            result.student_labelmap,
            paths["png"],
            result.labels.names,
            teacher_name=result.teacher.name,
            student_name=result.student.name,
        )
    return paths
