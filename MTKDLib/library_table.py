"""The model library as the module panel shows it: table rows and model choices (no Qt)."""

from __future__ import annotations

from collections.abc import Sequence

from mtkd.library import LibraryEntry

COLUMNS = ("Name", "Structures", "Format", "Size", "Created", "Teacher", "Validation Dice")


def format_size(size_bytes: int) -> str:
    """``1536`` -> ``"1.5 KB"``; binary units, one decimal."""
    value = float(size_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def library_rows(entries: Sequence[LibraryEntry]) -> list[list[str]]:
    """One row of :data:`COLUMNS` texts per entry; an unusable entry says why in its name."""
    rows = []
    for entry in entries:
        name = entry.name if entry.problem is None else f"{entry.name} (unusable: {entry.problem})"
        dice = "" if entry.validation_dice is None else f"{entry.validation_dice:.3f}"
        rows.append(
            [
                name,
                ", ".join(entry.labels),
                entry.format,
                format_size(entry.size_bytes),
                entry.created[:10],
                entry.teacher,
                dice,
            ]
        )
    return rows


def model_choices(entries: Sequence[LibraryEntry]) -> list[tuple[str, str]]:
    """(shown text, library key) of each usable model, for the model combo boxes."""
    return [
        (f"{entry.name} ({len(entry.labels)} structures)", entry.key)
        for entry in entries
        if entry.problem is None
    ]
