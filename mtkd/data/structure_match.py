"""Which segment of a case is which structure of a dataset: by terminology code, then by name.

A clinician's segment may be called ``Left Kidney``, ``kidney_left`` or ``Niere links``; what
does not vary is its terminology (SNOMED CT type ``64033007 Kidney``, modifier ``7771000
Left``). A dataset structure is matched to a case's segments in this order:

1. **code**: the segment whose type, type modifier, region and region modifier codes are the
   structure's (the structure's codes are MTKD's terminology table's, :mod:`mtkd.data.
   terminology`, for its name or one of its aliases). A code that two structures of the
   dataset share (the table gives one code to ``phalanges_feet`` and ``phalanges_hand``) is not
   used; those structures are matched by name;
2. **name**: the segment whose normalised name (:func:`~mtkd.data.terminology.normalize_name`)
   is the structure's name, one of the dataset's aliases for it (``mtkd.aliases`` in
   ``dataset.json``, :mod:`mtkd.data.partial_labels`) or one of the built-in aliases of the
   table's structure it names (:func:`builtin_aliases`: ``left_kidney`` for ``kidney_left``,
   ``l1_vertebra`` for ``vertebrae_L1``, ...).

Two segments that fit one structure at the same step, a segment that two structures claim, or
an alias that names two structures are refused with an error that names them: a guess there
would train one organ as another.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from mtkd.data.terminology import Code, SegmentStyle, lookup, normalize_name, table_names
from mtkd.errors import MTKDError

__all__ = [
    "CodeKey",
    "SegmentLabel",
    "builtin_aliases",
    "code_key",
    "match_segments",
    "segment_key",
    "style_code_key",
]

# (type, type modifier, region, region modifier), each "scheme:value" or "" when absent
CodeKey = tuple[str, str, str, str]
_SIDES = ("left", "right")


@dataclass(frozen=True)
class SegmentLabel:
    """A segment as matching sees it: its name and its terminology codes (None: none set)."""

    name: str
    code: CodeKey | None = None


def code_key(
    type_: Code | None,
    type_modifier: Code | None = None,
    region: Code | None = None,
    region_modifier: Code | None = None,
) -> CodeKey | None:
    """The codes that identify a structure (the category adds nothing); None without a type."""
    if type_ is None or not type_.value:
        return None

    def part(code: Code | None) -> str:
        return "" if code is None or not code.value else f"{code.scheme.upper()}:{code.value}"

    return (part(type_), part(type_modifier), part(region), part(region_modifier))


def style_code_key(style: SegmentStyle) -> CodeKey | None:
    """The code key of a terminology-table style (None for a name the table lacks)."""
    if not style.coded:
        return None
    return code_key(style.type, style.type_modifier, style.region, style.region_modifier)


def _variants(name: str) -> set[str]:
    """Other spellings of a table structure: side first (``left_kidney``) and the code
    meanings (``l1_vertebra``, ``left_adrenal_gland``)."""
    key = normalize_name(name)
    found = set()
    for side in _SIDES:
        if key.endswith("_" + side):
            found.add(f"{side}_{key[: -len(side) - 1]}")
    style = lookup(name)
    if style.type is not None and style.region is None:
        meaning = style.type.meaning
        if style.type_modifier is None:
            found.add(normalize_name(meaning))
        else:
            modifier = style.type_modifier.meaning
            found.update({normalize_name(f"{modifier} {meaning}"),
                          normalize_name(f"{meaning} {modifier}")})  # fmt: skip
    return {variant for variant in found if variant and variant != key}


@lru_cache(maxsize=1)
def builtin_aliases() -> dict[str, str]:
    """{normalised alias: normalised table name} for every structure of MTKD's terminology
    table; an alias two structures would share, or that is itself a table name, is left out."""
    owners: dict[str, set[str]] = {}
    for name in table_names():
        for variant in _variants(name):
            owners.setdefault(variant, set()).add(normalize_name(name))
    return {
        alias: next(iter(owner))
        for alias, owner in owners.items()
        if len(owner) == 1 and alias not in _table_keys()
    }


@lru_cache(maxsize=1)
def _table_codes() -> dict[CodeKey, str]:
    """{code key: normalised table name}; codes two table structures share are left out."""
    owners: dict[CodeKey, set[str]] = {}
    for name in table_names():
        code = style_code_key(lookup(name))
        if code is not None:
            owners.setdefault(code, set()).add(normalize_name(name))
    return {code: next(iter(names)) for code, names in owners.items() if len(names) == 1}


def segment_key(segment: SegmentLabel, aliases: Mapping[str, Sequence[str]] | None = None) -> str:
    """One key per structure, whatever a case calls it: the table structure of the segment's
    code, else of its name or alias (``aliases``: the dataset's, structure -> names), else its
    normalised name. Segments of different cases with one key are one structure."""
    if segment.code in _table_codes():
        return _table_codes()[segment.code]
    key = normalize_name(segment.name)
    for name, others in (aliases or {}).items():
        if key in {normalize_name(name), *(normalize_name(other) for other in others)}:
            key = normalize_name(name)
            break
    return _canonical([key]) or key


@dataclass(frozen=True)
class _Structure:
    name: str
    names: frozenset[str]  # normalised names that mean it
    code: CodeKey | None


@lru_cache(maxsize=1)
def _table_keys() -> frozenset[str]:
    return frozenset(normalize_name(name) for name in table_names())


def _canonical(keys: Sequence[str]) -> str | None:
    """The table structure that one of ``keys`` (normalised) names, if any."""
    for key in keys:
        if key in _table_keys():
            return key
        if key in builtin_aliases():
            return builtin_aliases()[key]
    return None


def _structures(
    structures: Sequence[str], aliases: Mapping[str, Sequence[str]], source: str | Path | None
) -> list[_Structure]:
    """Each structure's names and code; MTKDError when a name means two structures."""
    by_alias = {name: list(alias) for name, alias in aliases.items()}
    result, owner = [], {}
    for name in structures:
        own = [normalize_name(name), *(normalize_name(a) for a in by_alias.get(name, ()))]
        canonical = _canonical(own)
        names = set(own)
        if canonical is not None:
            names.add(canonical)
            names.update(a for a, target in builtin_aliases().items() if target == canonical)
        for key in sorted(names):
            if key in owner and owner[key] != name:
                raise MTKDError(
                    f"the name '{key}' means both '{owner[key]}' and '{name}' (through the "
                    "structure names and the alias table mtkd.aliases); give each structure "
                    "its own names",
                    source,
                )
            owner[key] = name
        code = None if canonical is None else style_code_key(lookup(canonical))
        result.append(_Structure(name, frozenset(names), code))
    codes = [s.code for s in result if s.code is not None]
    shared = {code for code in codes if codes.count(code) > 1}
    return [
        _Structure(s.name, s.names, None) if s.code in shared else s for s in result
    ]  # a code two structures share identifies neither


def _one(
    structure: str, found: list[int], segments: Sequence[SegmentLabel], how: str, where: str
) -> int | None:
    if len(found) > 1:
        shown = ", ".join(f"'{segments[i].name}'" for i in found)
        raise MTKDError(
            f"{where}: segments {shown} all fit structure '{structure}' (by {how}); "
            "keep one, or rename or recode the others"
        )
    return found[0] if found else None


def match_segments(
    segments: Sequence[SegmentLabel],
    structures: Sequence[str],
    aliases: Mapping[str, Sequence[str]] | None = None,
    *,
    where: str = "segmentation",
    source: str | Path | None = None,
) -> dict[str, int]:
    """{structure: index into ``segments``} for each structure some segment is (see the module
    docstring); structures no segment fits are left out. ``where`` names the segmentation in
    errors, ``source`` the file of the alias table. MTKDError on any ambiguity."""
    known = _structures(structures, aliases or {}, source)
    normalised = [normalize_name(segment.name) for segment in segments]
    matched: dict[str, int] = {}
    how: dict[int, tuple[str, str]] = {}  # segment index -> (structure, "code" or "name")
    for step in ("code", "name"):
        for structure in known:
            if structure.name in matched:
                continue
            if step == "code":
                if structure.code is None:
                    continue
                found = [i for i, s in enumerate(segments) if s.code == structure.code]
            else:
                found = [i for i, key in enumerate(normalised) if key in structure.names]
            index = _one(structure.name, found, segments, step, where)
            if index is None:
                continue
            if index in how:
                other, other_step = how[index]
                raise MTKDError(
                    f"{where}: segment '{segments[index].name}' fits both '{other}' (by "
                    f"{other_step}) and '{structure.name}' (by {step}); rename or recode it"
                )
            matched[structure.name] = index
            how[index] = (structure.name, step)
    return {name: matched[name] for name in structures if name in matched}
