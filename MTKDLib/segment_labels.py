"""A case's segments as the structures of a training set (no Qt): matched by terminology code
before names, and marked "not annotated" where nobody drew a structure.

Matching follows :mod:`mtkd.data.structure_match`: a segment's SNOMED CT codes (its
``TerminologyEntry``, read with Slicer's own Terminologies logic) first, then its name through
the dataset's alias table (``mtkd.aliases`` in ``dataset.json``) and MTKD's built-in aliases,
then its normalised name. Ambiguities are refused (ValueError naming the segments).

**Not annotated.** A structure the user did not draw in this case is not an empty structure: an
empty segment says "there is none here" (a removed kidney), which teaches background. The user
marks the segment instead (:func:`set_not_annotated`, a segment tag saved in the ``.seg.nrrd``;
:func:`add_not_annotated_segment` adds such a segment, empty, with the structure's name and
terminology). A marked segment's voxels, if any, are left out of the label map; the training set
records the structure as not annotated for the case (``mtkd.not_annotated``), and training and
scoring leave it out there (:mod:`mtkd.data.partial_labels`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import slicer

from mtkd.data.structure_match import SegmentLabel, code_key, match_segments
from mtkd.data.terminology import Code, lookup

__all__ = [
    "NOT_ANNOTATED_TAG",
    "CaseLabels",
    "add_not_annotated_segment",
    "is_not_annotated",
    "match_case",
    "segment_label",
    "set_not_annotated",
]

NOT_ANNOTATED_TAG = "MTKD.NotAnnotated"


@dataclass
class CaseLabels:
    """Which segment of a case is each structure: ``segment_ids`` (structure -> segment id,
    for the structures drawn), ``not_annotated`` (marked, in structure order) and ``missing``
    (no segment fits)."""

    segment_ids: dict[str, str] = field(default_factory=dict)
    not_annotated: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def _segment(segmentation_node: Any, segment_id: str) -> Any:
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise KeyError(f"no segment '{segment_id}' in '{segmentation_node.GetName()}'")
    return segment


def set_not_annotated(segmentation_node: Any, segment_id: str, not_annotated: bool = True) -> None:
    """Mark the segment ``segment_id`` as a structure nobody drew in this case (or unmark it)."""
    segment = _segment(segmentation_node, segment_id)
    if not_annotated:
        segment.SetTag(NOT_ANNOTATED_TAG, "1")
    else:
        segment.RemoveTag(NOT_ANNOTATED_TAG)
    segmentation_node.Modified()


def is_not_annotated(segment: Any) -> bool:
    """Whether a ``vtkSegment`` carries the not-annotated mark."""
    return bool(segment.HasTag(NOT_ANNOTATED_TAG))


def add_not_annotated_segment(segmentation_node: Any, structure: str) -> str:
    """Add an empty segment for ``structure`` (its name, colour and terminology from MTKD's
    table), marked not annotated; returns its id."""
    style = lookup(structure)
    segment_id = segmentation_node.GetSegmentation().AddEmptySegment("", structure, style.color)
    entry = style.terminology_entry()
    if entry:
        _segment(segmentation_node, segment_id).SetTerminology(entry)
    set_not_annotated(segmentation_node, segment_id)
    return segment_id


def _code(code_object: Any) -> Code | None:
    scheme, value = code_object.GetCodingSchemeDesignator(), code_object.GetCodeValue()
    return Code(scheme, value, code_object.GetCodeMeaning() or "") if scheme and value else None


def segment_label(segment: Any) -> SegmentLabel:
    """A segment's name and terminology codes (through Slicer's Terminologies logic)."""
    entry_text = segment.GetTerminology() if segment.HasTerminology() else ""
    entry = slicer.vtkSlicerTerminologyEntry()
    logic = slicer.vtkSlicerTerminologiesModuleLogic
    if not entry_text or not logic.DeserializeTerminologyEntry(entry_text, entry):
        return SegmentLabel(segment.GetName())
    codes = [
        _code(entry.GetTypeObject()),
        _code(entry.GetTypeModifierObject()),
        _code(entry.GetRegionObject()),
        _code(entry.GetRegionModifierObject()),
    ]
    return SegmentLabel(segment.GetName(), code_key(*codes))


def match_case(
    segmentation_node: Any,
    structures: Sequence[str],
    aliases: Mapping[str, Sequence[str]] | None = None,
) -> CaseLabels:
    """Match the segments of ``segmentation_node`` to ``structures`` (see the module
    docstring); ValueError naming the segmentation and segments when it is ambiguous."""
    segmentation = segmentation_node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    segments = [segmentation.GetSegment(segment_id) for segment_id in ids]
    matched = match_segments(
        [segment_label(segment) for segment in segments],
        structures,
        aliases,
        where=f"segmentation '{segmentation_node.GetName()}'",
    )
    result = CaseLabels()
    for structure in structures:
        if structure not in matched:
            result.missing.append(structure)
        elif is_not_annotated(segments[matched[structure]]):
            result.not_annotated.append(structure)
        else:
            result.segment_ids[structure] = ids[matched[structure]]
    return result


def mark_not_annotated(
    segmentation_node: Any,
    structure: str,
    structures: Sequence[str],
    aliases: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """Mark ``structure`` (one of the training set's ``structures``) as not annotated in this
    case: the segment that matches it (by code, alias or name) gets the mark, or an empty
    marked segment is added when none does. Returns the segment's id; ValueError for a
    structure the training set does not have."""
    if structure not in structures:
        raise ValueError(
            f"'{structure}' is not a structure of the training set ({', '.join(structures)})"
        )
    segmentation = segmentation_node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    matched = match_segments(
        [segment_label(segmentation.GetSegment(segment_id)) for segment_id in ids],
        structures,
        aliases,
        where=f"segmentation '{segmentation_node.GetName()}'",
    )
    if structure in matched:
        segment_id = ids[matched[structure]]
        set_not_annotated(segmentation_node, segment_id)
        return segment_id
    return add_not_annotated_segment(segmentation_node, structure)
