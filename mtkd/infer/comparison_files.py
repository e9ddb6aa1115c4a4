"""The files of a comparison, in one folder (:func:`write_comparison`):

- ``comparison.json``: everything :class:`~mtkd.infer.compare.ComparisonResult` holds; NaN
  (structure absent from both maps, or from the reference's label table) is written as
  ``null``. A structure that one map of a pair has and the other lacks entirely scores the
  penalty HD95 of :mod:`mtkd.metrics` (the image's diagonal in mm, ``hd95_penalty_mm``);
  ``missed`` counts them per pair (the first map of the pair is the reference side:
  ``missed`` = only in the first, ``spurious`` = only in the second);
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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from mtkd.data.atomic import atomic_write_bytes
from mtkd.data.image_io import check_same_grid
from mtkd.data.labels import LabelTable
from mtkd.data.segnrrd import segment_header
from mtkd.errors import MTKDError
from mtkd.infer.compare import ComparisonResult, StructureRow
from mtkd.infer.picture import structure_colors


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
