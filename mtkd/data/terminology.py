"""Standard codes and colours for structure names, for Slicer and DICOM segmentations.

The table is ``mtkd/resources/terminology.csv`` (TotalSegmentator's SNOMED CT mapping,
Apache-2.0, see ``TERMINOLOGY_LICENSE.md``). Names are matched case-insensitively with spaces and
hyphens treated as underscores. Unknown names get a deterministic colour derived from the name
and no codes.
"""

from __future__ import annotations

import colorsys
import csv
import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

__all__ = [
    "ANATOMIC_CONTEXT",
    "CONTEXT",
    "Code",
    "SegmentStyle",
    "lookup",
    "normalize_name",
    "table_names",
]

CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
_EMPTY_CODE = "^^"
_FIELDS = {
    "category": "SegmentedPropertyCategoryCodeSequence",
    "type": "SegmentedPropertyTypeCodeSequence",
    "type_modifier": "SegmentedPropertyTypeModifierCodeSequence",
    "region": "AnatomicRegionSequence",
    "region_modifier": "AnatomicRegionModifierSequence",
}


@dataclass(frozen=True)
class Code:
    """A coded concept: coding scheme designator (e.g. ``SCT``), code value, code meaning."""

    scheme: str
    value: str
    meaning: str

    def slicer(self) -> str:
        """Slicer's ``scheme^value^meaning`` form (separators removed from the parts)."""
        return "^".join(
            re.sub(r"[~^|]", " ", part) for part in (self.scheme, self.value, self.meaning)
        )


@dataclass(frozen=True)
class SegmentStyle:
    """Display colour (r, g, b in 0..1) and terminology codes (None where unknown)."""

    name: str
    color: tuple[float, float, float]
    category: Code | None = None
    type: Code | None = None
    type_modifier: Code | None = None
    region: Code | None = None
    region_modifier: Code | None = None

    @property
    def coded(self) -> bool:
        """True when category and type codes are known."""
        return self.category is not None and self.type is not None

    def terminology_entry(self) -> str | None:
        """Slicer's ``TerminologyEntry`` tag value, or None without codes.

        ``context~category~type~typeModifier~anatomicContext~region~regionModifier``, each code
        as ``scheme^value^meaning`` (``^^`` when absent).
        """
        if not self.coded:
            return None

        def part(code: Code | None) -> str:
            return _EMPTY_CODE if code is None else code.slicer()

        return "~".join(
            [
                CONTEXT,
                part(self.category),
                part(self.type),
                part(self.type_modifier),
                ANATOMIC_CONTEXT,
                part(self.region),
                part(self.region_modifier),
            ]
        )


def normalize_name(name: str) -> str:
    """``"Vertebrae L5"`` -> ``"vertebrae_l5"``: lower case, runs of other characters -> ``_``."""
    return re.sub(r"[^0-9a-z]+", "_", name.strip().lower()).strip("_")


def _code(row: dict[str, str], prefix: str) -> Code | None:
    scheme = row.get(f"{prefix}.CodingSchemeDesignator", "").strip()
    value = row.get(f"{prefix}.CodeValue", "").strip()
    meaning = row.get(f"{prefix}.CodeMeaning", "").strip()
    if not (scheme and value):
        return None
    return Code(scheme, value, meaning)


def _rgb(text: str) -> tuple[float, float, float] | None:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    r, g, b = (round(min(int(p), 255) / 255.0, 6) for p in parts)
    return (r, g, b)


@lru_cache(maxsize=1)
def _table() -> dict[str, SegmentStyle]:
    source = resources.files("mtkd").joinpath("resources").joinpath("terminology.csv")
    table: dict[str, SegmentStyle] = {}
    with source.open("r", encoding="utf-8", newline="") as stream:
        for row in csv.DictReader(stream):
            name = row.get("Structure", "").strip()
            if not name:
                continue
            codes = {key: _code(row, prefix) for key, prefix in _FIELDS.items()}
            color = _rgb(row.get("DicomRGBColor", "")) or generated_color(name)
            table[normalize_name(name)] = SegmentStyle(name, color, **codes)
    return table


def generated_color(name: str) -> tuple[float, float, float]:
    """A deterministic, saturated colour for ``name`` (hue from a hash of the normalized name)."""
    digest = hashlib.sha256(normalize_name(name).encode()).digest()
    hue = int.from_bytes(digest[:4], "big") / 2**32
    saturation = 0.45 + 0.4 * digest[4] / 255
    value = 0.75 + 0.2 * digest[5] / 255
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
    return (round(r, 6), round(g, 6), round(b, 6))


def table_names() -> list[str]:
    """The structure names of the table, as written there."""
    return [style.name for style in _table().values()]


def lookup(name: str) -> SegmentStyle:
    """Style of structure ``name``: codes and colour from the table, else a generated colour.

    The returned style carries ``name`` as given.
    """
    known = _table().get(normalize_name(name))
    if known is None:
        return SegmentStyle(name, generated_color(name))
    return SegmentStyle(
        name,
        known.color,
        known.category,
        known.type,
        known.type_modifier,
        known.region,
        known.region_modifier,
    )
