"""Stored segmentations of another tool: one file or folder read on a reference grid, and a
folder of them (teacher outputs), one per training case.

A stored segmentation (first match wins when looking up ``<case_id>`` in a folder) is:

- ``.npz``: nnU-Net probabilities (``--save_probabilities``), key ``probabilities`` (or
  ``softmax``) of shape (C, z, y, x) on the image's voxels; read with ``allow_pickle=False``
  (nnU-Net's ``.pkl`` sidecar is never read);
- ``.seg.nrrd``: a Slicer segmentation (its segment names label it);
- ``.nii.gz`` / ``.nii`` / ``.nrrd`` / ``.mha``: a label map (x, y, z), or a probability map
  (4-D (x, y, z, C) or a vector image);
- a folder of binary masks ``<structure>.nii.gz`` (TotalSegmentator's default output without
  ``--ml``).

Probability channels: C = (largest label value + 1) is channel c = label value c (0 =
background); C = (number of labels + 1) is the background then the labels in table order;
C = number of labels is the labels in table order without background.

For teacher outputs, label names come from ``labels.json`` or ``dataset.json`` in the folder,
else from the run's ``data.labels_json``. Teacher structures are matched to the student's by
name; the teacher may segment more structures than the student. Outputs must lie on the case
image's grid.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor

from mtkd.data.image_io import (
    IMAGE_SUFFIXES,
    check_same_grid,
    image_suffix,
    itk_error_reason,
    read_label,
    strip_image_suffix,
)
from mtkd.data.labels import LabelTable, label_values_in, remap_label_array
from mtkd.data.preprocess import sitk_affine_ras
from mtkd.data.segnrrd import read_seg_nrrd
from mtkd.errors import MTKDError

__all__ = [
    "LABEL_FILES",
    "StoredMap",
    "StoredOutputs",
    "TeacherMap",
    "match_by_name",
    "open_stored_outputs",
    "read_stored_map",
    "stored_label_table",
]

LABEL_FILES = ("labels.json", "dataset.json")
_VOLUME_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha")
_NPZ_KEYS = ("probabilities", "softmax")
_GENERATED_NAME = re.compile(r"^label_\d+$")
_PROBABILITY_TOLERANCE = 1e-3


# ----------------------------------------------------------------- one stored segmentation
@dataclass
class StoredMap:
    """A stored segmentation read on a reference grid, arrays in (z, y, x) voxel order.

    Either ``labelmap`` (values of ``labels``, 0 = background) or ``probabilities``
    (C, z, y, x), where ``channels[i]`` holds the i-th label of ``labels`` and ``background``
    the background (None: no background channel).
    """

    labels: LabelTable
    labelmap: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    channels: list[int] | None = None
    background: int | None = None

    def as_labelmap(self, path: str | Path | None = None) -> np.ndarray:
        """The label map (z, y, x), UInt8 or UInt16: stored, or the most probable label."""
        if self.probabilities is None:
            assert self.labelmap is not None
            return self.labelmap
        assert self.channels is not None
        count = len(self.probabilities)
        if self.background is None:
            raise MTKDError(
                f"probability map has {count} channels and no background; {count + 1} "
                "expected to take the most probable label",
                path,
            )
        order = [self.background, *self.channels]
        scores = self.probabilities if order == list(range(count)) else self.probabilities[order]
        lookup = np.array([0, *self.labels.label_values])
        return lookup[np.argmax(scores, axis=0)].astype(_label_dtype(self.labels))


def _label_dtype(table: LabelTable) -> type:
    return np.uint8 if max(table.label_values, default=0) <= 255 else np.uint16


def _mask_files(folder: Path) -> dict[str, Path]:
    """Structure name -> mask file of a folder of binary masks named ``<structure>.nii.gz``."""
    files = {
        strip_image_suffix(child.name): child
        for child in sorted(folder.iterdir())
        if child.is_file() and image_suffix(child) is not None
    }
    if not files:
        raise MTKDError(f"folder holds no masks ({', '.join(IMAGE_SUFFIXES)})", folder)
    return files


def stored_label_table(path: str | Path) -> LabelTable | None:
    """The label table a self-describing output carries (a mask folder: its file names, sorted;
    a ``.seg.nrrd``: its segments), else None."""
    path = Path(path)
    if path.is_dir():
        return LabelTable(enumerate(sorted(_mask_files(path)), start=1), source=path)
    if path.name.lower().endswith(".seg.nrrd"):
        return read_seg_nrrd(path)[1]
    return None


def _needs_table(path: Path) -> MTKDError:
    return MTKDError(
        "a stored label or probability map needs a label table naming its values: a labels "
        'JSON ({"1": "spleen", ...}) or the tool\'s dataset.json (for stored teacher outputs: '
        "next to them, or data.labels_json)",
        path,
    )


def read_stored_map(
    path: str | Path, reference: sitk.Image, labels: LabelTable | None = None
) -> StoredMap:
    """Read a stored segmentation (file or mask folder), checked to lie on ``reference``.

    ``labels`` names the values (channels) of a label (probability) map; a mask folder reads
    the masks of its structures (default: all, sorted by name; the first keeps a voxel); a
    ``.seg.nrrd`` keeps its own segment names unless they are generated (``label_<n>``) and
    ``labels`` is given. MTKDError naming the file for any problem.
    """
    path = Path(path)
    if path.is_dir():
        table = labels if labels is not None else stored_label_table(path)
        assert table is not None
        return StoredMap(table, labelmap=_read_masks(path, reference, table))
    name = path.name.lower()
    if name.endswith(".seg.nrrd"):
        label, table = read_seg_nrrd(path)
        check_same_grid(label, reference, path)
        if labels is not None and all(_GENERATED_NAME.match(n) for n in table.names):
            table = labels  # a plain labelmap NRRD: names given elsewhere
        return _checked_label_map(sitk.GetArrayFromImage(label), table, path)
    if labels is None:
        raise _needs_table(path)
    if name.endswith(".npz"):
        return _with_channels(_read_npz(path, reference), labels, path)
    if _is_multichannel(path):
        return _with_channels(_read_probability_image(path, reference), labels, path)
    label = read_label(path, reference=reference)
    return _checked_label_map(sitk.GetArrayFromImage(label), labels, path)


def _checked_label_map(array: np.ndarray, table: LabelTable, path: Path) -> StoredMap:
    unknown = [v for v in label_values_in(array) if v != 0 and v not in table]
    if unknown:
        raise MTKDError(f"label values {unknown[:20]} are not in the map's label table", path)
    return StoredMap(table, labelmap=array)


def _read_masks(folder: Path, reference: sitk.Image, table: LabelTable) -> np.ndarray:
    files = _mask_files(folder)
    missing = [name for name in table.names if name not in files]
    if missing:
        raise MTKDError(f"no mask file for {', '.join(missing)} (<structure>.nii.gz)", folder)
    array = np.zeros(reference.GetSize()[::-1], dtype=_label_dtype(table))
    for value, name in table.items():  # the first listed structure keeps a voxel
        mask = sitk.GetArrayFromImage(read_label(files[name], reference=reference)) > 0
        array[mask & (array == 0)] = value
    return array


def _read_npz(path: Path, reference: sitk.Image) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as archive:
            key = next((k for k in _NPZ_KEYS if k in archive.files), None)
            if key is None:
                raise MTKDError(
                    f"no 'probabilities' array (holds {', '.join(archive.files)})", path
                )
            probabilities = np.asarray(archive[key])
    except (OSError, ValueError) as error:
        raise MTKDError(f"cannot read probabilities ({error})", path) from None
    expected = tuple(reference.GetSize()[::-1])
    if probabilities.ndim != 4 or probabilities.shape[1:] != expected:
        raise MTKDError(
            f"probability map grid differs from the image grid: array shape "
            f"{probabilities.shape}, expected (C, z, y, x) with (z, y, x) = {expected}",
            path,
        )
    return probabilities


def _read_probability_image(path: Path, reference: sitk.Image) -> np.ndarray:
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise MTKDError(f"cannot read probabilities: {itk_error_reason(error)}", path) from None
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        grid = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
        array = sitk.GetArrayFromImage(image)  # (C, z, y, x)
    elif image.GetDimension() == 3:
        grid = sitk.VectorIndexSelectionCast(image, 0)
        array = np.moveaxis(sitk.GetArrayFromImage(image), -1, 0)  # (z, y, x, C) -> (C, ...)
    else:
        raise MTKDError(f"{image.GetDimension()}-D image; expected (x, y, z[, C])", path)
    check_same_grid(grid, reference, path)
    return array


def _with_channels(array: np.ndarray, table: LabelTable, path: Path) -> StoredMap:
    """Find the channel of each label (see the module docstring) and check the values."""
    count, top = len(array), max(table.label_values)
    if count == top + 1:
        channels, background = table.label_values, 0
    elif count == len(table) + 1:
        channels, background = list(range(1, count)), 0
    elif count == len(table):
        channels, background = list(range(count)), None
    else:
        layouts: dict[int, str] = {}
        layouts.setdefault(top + 1, "background, then channel = label value")
        layouts.setdefault(len(table) + 1, "background, then the labels in table order")
        layouts.setdefault(len(table), "the labels in table order, no background")
        shown = " or ".join(f"{n} expected ({why})" for n, why in layouts.items())
        raise MTKDError(f"probability map has {count} channels; {shown}", path)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise MTKDError("probability map has NaN or infinite values", path)
    return StoredMap(table, probabilities=array, channels=channels, background=background)


def _is_multichannel(path: Path) -> bool:
    """True for a 4-D image with several volumes or a vector image (a probability map)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return False  # read_label reports the problem
    size = reader.GetSize()
    return reader.GetNumberOfComponents() > 1 or (len(size) == 4 and size[3] > 1)


# ----------------------------------------------------------------- teacher outputs
def match_by_name(
    teacher: LabelTable, structures: LabelTable, source: str | Path | None = None
) -> list[int]:
    """The teacher's label value of each student structure (in the student's order).

    MTKDError naming ``source`` and listing the student structures the teacher lacks.
    """
    by_name = {name: value for value, name in teacher.items()}
    missing = [name for name in structures.names if name not in by_name]
    if missing:
        shown = ", ".join(teacher.names[:30]) + (" ..." if len(teacher) > 30 else "")
        raise MTKDError(
            f"the teacher does not segment {', '.join(missing)}; it segments: {shown}. "
            "Choose data.structures among the teacher's",
            source,
        )
    return [by_name[name] for name in structures.names]


@dataclass
class TeacherMap:
    """One case's stored teacher output on the case image's grid, for the student's K structures.

    ``data`` is a MetaTensor with the image's RAS affine: a label map (1, X, Y, Z) int64
    (0 = background, k = the k-th student structure) when ``is_label_map``, else the
    probabilities (K, X, Y, Z) float32 of the student's structures (no background channel).
    """

    data: MetaTensor
    is_label_map: bool


class StoredOutputs:
    """A folder of stored teacher outputs, read case by case for the student's structures."""

    def __init__(
        self,
        folder: Path,
        labels: LabelTable | None,
        structures: LabelTable,
        labels_source: Path | None = None,
    ):
        self.folder = folder
        self.labels = labels  # the folder's label table (None: only self-describing files)
        self.structures = structures
        if labels is not None:
            match_by_name(labels, structures, labels_source or folder)

    # ------------------------------------------------------------- finding
    def find(self, case_id: str) -> Path | None:
        """The stored output of ``case_id`` (a file or a folder of masks), or None."""
        for name in (f"{case_id}.npz", f"{case_id}.seg.nrrd"):
            if (self.folder / name).is_file():
                return self.folder / name
        for ending in _VOLUME_ENDINGS:
            if (self.folder / f"{case_id}{ending}").is_file():
                return self.folder / f"{case_id}{ending}"
        if (self.folder / case_id).is_dir():
            return self.folder / case_id
        return None

    def check_cases(self, case_ids: Iterable[str]) -> None:
        """MTKDError naming the folder and every case without a stored output."""
        missing = [case_id for case_id in case_ids if self.find(case_id) is None]
        if missing:
            raise self._missing(missing)

    def _missing(self, case_ids: list[str]) -> MTKDError:
        shown = ", ".join(case_ids[:10])
        if len(case_ids) > 10:
            shown += f" and {len(case_ids) - 10} more"
        return MTKDError(
            f"no stored teacher output for case(s) {shown}; expected <case_id>.npz, "
            "<case_id>.seg.nrrd, <case_id>.nii.gz (.nii, .nrrd, .mha) or a <case_id>/ folder "
            "of masks",
            self.folder,
        )

    # ------------------------------------------------------------- reading
    def read(self, case_id: str, reference: sitk.Image) -> TeacherMap:
        """Case ``case_id``'s teacher output for the student's structures, checked to lie on
        ``reference`` (the case image)."""
        path = self.find(case_id)
        if path is None:
            raise self._missing([case_id])
        # a mask folder: just the student's structures, numbered 1..K
        own = LabelTable(enumerate(self.structures.names, start=1)) if path.is_dir() else None
        stored = read_stored_map(path, reference, self.labels if own is None else own)
        values = match_by_name(stored.labels, self.structures, path)
        if stored.probabilities is None:
            return self._label_map(stored.as_labelmap(), values, reference)
        return self._probabilities(stored, values, reference, path)

    def _label_map(self, array: np.ndarray, values: list[int], reference: sitk.Image) -> TeacherMap:
        """A teacher label map (z, y, x) in the teacher's values -> student numbering."""
        mapping = {value: index for index, value in enumerate(values, start=1)}
        remapped = remap_label_array(array, mapping).transpose(2, 1, 0)
        tensor = torch.as_tensor(np.ascontiguousarray(remapped)).long()[None]
        return TeacherMap(_meta(tensor, reference), is_label_map=True)

    def _probabilities(
        self, stored: StoredMap, values: list[int], reference: sitk.Image, path: Path
    ) -> TeacherMap:
        """The probabilities (K, X, Y, Z) of the student's structures, checked to be in 0..1."""
        assert stored.probabilities is not None and stored.channels is not None
        table_values = stored.labels.label_values
        picked = [stored.channels[table_values.index(v)] for v in values]
        selected = np.asarray(stored.probabilities[picked], dtype=np.float32)
        low, high = (float(selected.min()), float(selected.max())) if selected.size else (0, 0)
        if low < -_PROBABILITY_TOLERANCE or high > 1 + _PROBABILITY_TOLERANCE:
            raise MTKDError(
                f"probability map has values from {low:g} to {high:g}, outside 0..1", path
            )
        tensor = torch.as_tensor(np.ascontiguousarray(selected.transpose(0, 3, 2, 1)))
        return TeacherMap(_meta(tensor.clamp(0.0, 1.0), reference), is_label_map=False)


def _meta(tensor: torch.Tensor, reference: sitk.Image) -> MetaTensor:
    return MetaTensor(tensor, affine=torch.as_tensor(sitk_affine_ras(reference)))


def open_stored_outputs(
    folder: str | Path, structures: LabelTable, labels_json: str | Path | None = None
) -> StoredOutputs:
    """The stored outputs in ``folder`` for the student's ``structures``.

    The label table is ``labels.json`` or ``dataset.json`` in the folder, else ``labels_json``;
    when one is found, every student structure must be in it (MTKDError listing those missing).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MTKDError(
            "stored teacher outputs must be a folder with one file per case (<case_id>.nii.gz, "
            "<case_id>.npz, ...)",
            folder,
        )
    source = next((folder / n for n in LABEL_FILES if (folder / n).is_file()), None)
    if source is None and labels_json:
        source = Path(labels_json)
    table = None if source is None else LabelTable.from_json(source)
    return StoredOutputs(folder, table, structures, source)
