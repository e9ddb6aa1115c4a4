"""What a dataset says about its labels beyond the label table: the structures a case does not
annotate, and other names for its structures.

Both live in the dataset's ``dataset.json`` (MSD or nnU-Net v2 layout) under the key
``"mtkd"``, which nnU-Net and MONAI ignore::

    "mtkd": {
      "not_annotated": {"case_007": ["spleen"], "case_012": ["spleen", "kidney_left"]},
      "aliases": {"kidney_left": ["left kidney", "Niere links"]}
    }

``not_annotated``: per case id, the structures (names of ``labels``) nobody drew in that case.
Their voxels in the case's label map are unknown, not background: training masks them out of
the segmentation loss (:mod:`mtkd.engine.seg_loss`) and scoring skips them (outcome ``not
annotated``, :mod:`mtkd.metrics`). The label map must have no voxel of such a structure.

``aliases``: per structure, other names a clinician's segment may carry; segments are matched
to structures by terminology code first, then by these names (:mod:`mtkd.data.structure_match`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mtkd.data.labels import LabelTable
from mtkd.errors import MTKDError

__all__ = ["SECTION", "read_aliases", "read_not_annotated", "with_not_annotated"]

SECTION = "mtkd"


def _section(data: Mapping[str, Any], key: str, path: Path | None) -> Mapping[str, Any]:
    section = data.get(SECTION, {})
    if not isinstance(section, Mapping):
        raise MTKDError(f"'{SECTION}' must be a JSON object, got {section!r}", path)
    entry = section.get(key, {})
    if not isinstance(entry, Mapping):
        raise MTKDError(f"'{SECTION}.{key}' must be a JSON object, got {entry!r}", path)
    return entry


def _names(value: Any, key: str, path: Path | None) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise MTKDError(f"'{key}' must be a list of names, got {value!r}", path)
    return [v.strip() for v in value]


def read_not_annotated(
    data: Mapping[str, Any], labels: LabelTable, case_ids: Sequence[str], path: Path | None
) -> dict[str, tuple[str, ...]]:
    """{case id: structures it does not annotate} from ``data`` (a parsed dataset.json);
    MTKDError naming ``path`` and the key for an unknown case or structure."""
    entries = _section(data, "not_annotated", path)
    known = set(case_ids)
    result: dict[str, tuple[str, ...]] = {}
    for case_id, value in entries.items():
        key = f"{SECTION}.not_annotated.{case_id}"
        if case_id not in known:
            raise MTKDError(f"'{key}': the dataset has no case '{case_id}'", path)
        names = _names(value, key, path)
        unknown = [name for name in names if name not in labels.names]
        if unknown:
            raise MTKDError(
                f"'{key}' names {', '.join(unknown)}, not structures of the label table "
                f"({', '.join(labels.names)})",
                path,
            )
        if names:
            result[case_id] = tuple(dict.fromkeys(names))
    return result


def read_aliases(
    data: Mapping[str, Any], labels: LabelTable, path: Path | None
) -> dict[str, tuple[str, ...]]:
    """{structure: its other names} from ``data`` (a parsed dataset.json); MTKDError naming
    ``path`` and the key for a structure the label table lacks."""
    entries = _section(data, "aliases", path)
    result: dict[str, tuple[str, ...]] = {}
    for name, value in entries.items():
        key = f"{SECTION}.aliases.{name}"
        if name not in labels.names:
            raise MTKDError(
                f"'{key}': '{name}' is not a structure of the label table "
                f"({', '.join(labels.names)})",
                path,
            )
        result[name] = tuple(_names(value, key, path))
    return result


def with_not_annotated(
    data: Mapping[str, Any], case_id: str, structures: Sequence[str]
) -> dict[str, Any]:
    """A copy of ``data`` (a parsed dataset.json) recording that ``case_id`` does not
    annotate ``structures`` (none: the case's entry is removed)."""
    data = dict(data)
    section = dict(data.get(SECTION) or {})
    entries = {k: v for k, v in dict(section.get("not_annotated") or {}).items() if k != case_id}
    if structures:
        entries[case_id] = list(dict.fromkeys(structures))
    section["not_annotated"] = entries
    data[SECTION] = section
    return data
