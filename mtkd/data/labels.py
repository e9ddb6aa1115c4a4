"""Label tables (label value -> structure name) and label-map checks and remapping.

Background is value 0 and never part of a table. Tables are read from MSD / nnU-Net
``dataset.json`` files, TotalSegmentator-style JSON (``{"1": "spleen", ...}``) or made up from
the values found in label maps.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from mtkd.errors import MTKDError

__all__ = ["LabelTable", "check_label_map", "label_values_in", "remap_label_array"]

_LUT_LIMIT = 1 << 20  # largest label value remapped through a dense lookup table


def _as_int(text: Any) -> int | None:
    if isinstance(text, bool):
        return None
    if isinstance(text, int):
        return text
    if isinstance(text, str) and text.strip().lstrip("+-").isdecimal():
        return int(text.strip())
    return None


def _check_name(name: Any, source: str | Path | None) -> str:
    if not isinstance(name, str) or not name.strip():
        raise MTKDError(f"label name must be a non-empty string, got {name!r}", source)
    if any(ord(ch) < 32 for ch in name):
        raise MTKDError(f"label name {name!r} contains control characters", source)
    return name.strip()


class LabelTable(Mapping[int, str]):
    """Ordered mapping label value (int > 0) -> structure name; background 0 is implicit.

    Iterating yields label values in table order; ``table[value]`` is the name.
    """

    def __init__(
        self,
        entries: Mapping[int, str] | Iterable[tuple[int, str]] = (),
        source: str | Path | None = None,
    ):
        pairs = entries.items() if isinstance(entries, Mapping) else entries
        self._names: dict[int, str] = {}
        seen: dict[str, int] = {}
        for value, name in pairs:
            number = _as_int(value)
            if number is None or number <= 0:
                raise MTKDError(f"label value must be an integer > 0, got {value!r}", source)
            name = _check_name(name, source)
            if number in self._names:
                raise MTKDError(f"label value {number} is listed twice", source)
            if name in seen:
                raise MTKDError(
                    f"label name '{name}' is used for values {seen[name]} and {number}", source
                )
            self._names[number] = name
            seen[name] = number
        self._values_by_name = seen

    # Mapping protocol
    def __getitem__(self, value: int) -> str:
        return self._names[value]

    def __iter__(self) -> Iterator[int]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LabelTable):
            return NotImplemented
        return list(self._names.items()) == list(other._names.items())

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"LabelTable({self._names!r})"

    @property
    def label_values(self) -> list[int]:
        """Label values in table order."""
        return list(self._names)

    @property
    def names(self) -> list[str]:
        """Structure names in table order."""
        return list(self._names.values())

    def value_of(self, name: str) -> int:
        """The label value of structure ``name`` (MTKDError listing the names if unknown)."""
        if name not in self._values_by_name:
            raise MTKDError(f"unknown structure '{name}'; available: {', '.join(self.names)}")
        return self._values_by_name[name]

    # constructors
    @classmethod
    def from_msd(
        cls, dataset_json: Mapping[str, Any], path: str | Path | None = None
    ) -> LabelTable:
        """From a parsed MSD or nnU-Net v2 ``dataset.json`` (its ``labels`` entry).

        MSD: ``{"0": "background", "1": "spleen"}``; nnU-Net v2: ``{"background": 0, "spleen": 1}``.
        nnU-Net's region-based labels (``"liver": [1, 2]``) and its ``ignore`` label are
        refused, naming the file and the label.
        """
        if not isinstance(dataset_json, Mapping) or "labels" not in dataset_json:
            raise MTKDError("dataset.json has no 'labels' entry", path)
        return cls.from_dict(dataset_json["labels"], source=path)

    @classmethod
    def from_json(cls, path: str | Path) -> LabelTable:
        """From a labels JSON file (``{"1": "spleen"}``, nnU-Net style, or a whole dataset.json)."""
        path = Path(path)
        if not path.is_file():
            raise MTKDError("labels file not found", path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise MTKDError(f"not valid JSON ({error})", path) from None
        if isinstance(data, Mapping) and "labels" in data:
            return cls.from_msd(data, path)
        return cls.from_dict(data, source=path)

    @classmethod
    def from_dict(cls, data: Any, source: str | Path | None = None) -> LabelTable:
        """From ``{"1": "spleen", ...}`` (``to_dict`` output, MSD) or ``{"spleen": 1, ...}``.

        Entries for value 0 (background) are dropped; entries are sorted by label value.
        """
        if not isinstance(data, Mapping) or not data:
            raise MTKDError("labels must be a non-empty JSON object", source)
        pairs: list[tuple[int, str]] = []
        for key, item in data.items():
            key_int, item_int = _as_int(key), _as_int(item)
            if key_int is not None and isinstance(item, str) and item_int is None:
                pairs.append((key_int, item))
            elif item_int is not None and key_int is None:
                if key == "ignore":
                    raise MTKDError(
                        "label 'ignore' is nnU-Net's ignore label (voxels nobody labelled), "
                        "which MTKD does not read; list the structures a case does not "
                        "annotate under mtkd.not_annotated instead",
                        source,
                    )
                pairs.append((item_int, key))
            elif isinstance(item, (list, tuple)):
                raise MTKDError(
                    f"label '{key}' is region-based ({list(item)}); one value per label is needed",
                    source,
                )
            else:
                raise MTKDError(f"cannot read label entry {key!r}: {item!r}", source)
        pairs = [(value, name) for value, name in pairs if value != 0]
        if not pairs:
            raise MTKDError("labels list only the background", source)
        if any(value < 0 for value, _ in pairs):
            raise MTKDError("label values must not be negative", source)
        return cls(sorted(pairs), source=source)

    @classmethod
    def from_label_values(cls, values: Iterable[int]) -> LabelTable:
        """Names ``label_<value>`` for each distinct non-zero value."""
        distinct = sorted({int(v) for v in values} - {0})
        if distinct and distinct[0] < 0:
            raise MTKDError(f"label values must not be negative, got {distinct[0]}")
        return cls((v, f"label_{v}") for v in distinct)

    def to_dict(self) -> dict[str, str]:
        """JSON-ready ``{"1": "spleen", ...}`` in table order."""
        return {str(value): name for value, name in self._names.items()}

    def select(self, names: Iterable[str]) -> tuple[LabelTable, dict[int, int]]:
        """Keep ``names`` renumbered 1..K in the given order.

        Returns the new table and the value remapping ``{old value: new value}``.
        """
        names = list(names)
        if not names:
            raise MTKDError("no structures selected")
        unknown = [n for n in names if n not in self._values_by_name]
        if unknown:
            raise MTKDError(
                f"unknown structure(s) {', '.join(unknown)}; available: {', '.join(self.names)}"
            )
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise MTKDError(f"structure(s) selected twice: {', '.join(duplicates)}")
        mapping = {self._values_by_name[name]: new for new, name in enumerate(names, start=1)}
        return LabelTable((new, name) for new, name in enumerate(names, start=1)), mapping


def _array_of(label: sitk.Image | np.ndarray) -> np.ndarray:
    if isinstance(label, sitk.Image):
        return sitk.GetArrayViewFromImage(label)
    return np.asarray(label)


_COUNT_CHUNK = 1 << 22  # voxels per bincount in label_values_in (32 MiB of int64)


def label_values_in(label: sitk.Image | np.ndarray) -> list[int]:
    """Sorted distinct values of a label map (image or integer array), background included."""
    array = _array_of(label)
    if array.size == 0:
        return []
    if array.dtype in (np.uint8, np.uint16):  # counted in chunks: bincount copies to int64
        flat = array.reshape(-1)
        counts = np.zeros(1 << (8 * array.itemsize), dtype=np.int64)
        for start in range(0, flat.size, _COUNT_CHUNK):
            counts += np.bincount(flat[start : start + _COUNT_CHUNK], minlength=counts.size)
        return [int(v) for v in np.flatnonzero(counts)]
    return [int(v) for v in np.unique(array)]


def check_label_map(
    label_image: sitk.Image | np.ndarray, table: LabelTable, path: str | Path | None
) -> list[int]:
    """MTKDError (naming ``path``) if the map is all background or holds values not in ``table``.

    Returns the foreground values present, sorted.
    """
    present = [v for v in label_values_in(label_image) if v != 0]
    if not present:
        raise MTKDError("label map is empty (every voxel is background 0)", path)
    unknown = [v for v in present if v not in table]
    if unknown:
        shown = ", ".join(map(str, unknown[:20])) + (" ..." if len(unknown) > 20 else "")
        known = ", ".join(f"{v}={n}" for v, n in list(table.items())[:20])
        more = " ..." if len(table) > 20 else ""
        raise MTKDError(
            f"label map has values not in the label table: {shown} "
            f"(table: {known or 'empty'}{more})",
            path,
        )
    return present


def _output_dtype(largest: int) -> type[np.integer]:
    if largest <= np.iinfo(np.uint8).max:
        return np.uint8
    if largest <= np.iinfo(np.uint16).max:
        return np.uint16
    return np.int32


def remap_label_array(array: np.ndarray, mapping: Mapping[int, int]) -> np.ndarray:
    """Replace each value ``old`` by ``mapping[old]``; values not in ``mapping`` become 0.

    ``array`` has any shape and integer values (floats holding whole numbers are accepted).
    The result has the same shape and the smallest unsigned type that holds the new values.
    """
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.integer):
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            raise MTKDError("label array has non-integer values")
        array = rounded.astype(np.int64)
    if any(old < 0 or new < 0 for old, new in mapping.items()):
        raise MTKDError("label remapping must not use negative values")
    dtype = _output_dtype(max(mapping.values(), default=0))
    if array.size == 0:
        return np.zeros(array.shape, dtype=dtype)
    low, high = int(array.min()), int(array.max())
    if low < 0:
        raise MTKDError(f"label array has negative values (down to {low})")
    if high < _LUT_LIMIT:
        lut = np.zeros(high + 1, dtype=dtype)
        for old, new in mapping.items():
            if old <= high:
                lut[old] = new
        return lut[array]
    distinct, inverse = np.unique(array, return_inverse=True)
    mapped = np.array([mapping.get(int(v), 0) for v in distinct], dtype=dtype)
    return mapped[inverse].reshape(array.shape)
