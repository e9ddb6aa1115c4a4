"""The printed summary of a comparison: cost per model, scores per structure, unmatched
structures."""

from __future__ import annotations

import math

from mtkd.infer.compare import REFERENCE_FIELDS, ComparisonResult, shorten_names
from mtkd.infer.evaluate import format_score, format_table
from mtkd.metrics import PENALTY_NOTE, format_missed


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
        fields += list(REFERENCE_FIELDS[:4])
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
    lines += [f"{label} ({len(names)}): {shorten_names(names)}" for label, names in notes if names]
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
