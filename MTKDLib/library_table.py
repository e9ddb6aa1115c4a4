"""The model library as the module panel shows it: table rows and model choices (no Qt)."""

from __future__ import annotations

from collections.abc import Sequence

from mtkd.library import LibraryEntry

COLUMNS = (
    "Name",
    "Structures",
    "Format",
    "Size",
    "Created",
    "Teacher",
    "Validation Dice",
    "Version",
)


def format_size(size_bytes: int) -> str:
    """``1536`` -> ``"1.5 KB"``; binary units, one decimal."""
    value = float(size_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def version_text(history: dict) -> str:
    """The annotate-then-distill lineage of an entry, e.g. ``v2 of abdomen-student (+3 cases,
    Dice 0.712 -> 0.768)``; empty for a model that is not a loop version."""
    if not history.get("version"):
        return ""
    text = f"v{history['version']}"
    if history.get("previous"):
        text += f" of {history['previous']}"
    details = []
    if history.get("cases_added") is not None:
        count = len(history["cases_added"])
        details.append(f"+{count} case{'s' if count != 1 else ''}")
    before, after = history.get("val_dice_before"), history.get("val_dice_after")
    if before is not None and after is not None:
        details.append(f"Dice {before:.3f} -> {after:.3f}")
    return text + (f" ({', '.join(details)})" if details else "")


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
                version_text(entry.history),
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
