"""Stored teacher outputs: another tool's segmentations of the training cases, one per case.

A folder holds, for each training case ``<case_id>`` (first match wins):

- ``<case_id>.npz``: nnU-Net probabilities (``--save_probabilities``), key ``probabilities`` of
  shape (C, z, y, x) on the case image's voxels, channel c = label value c (0 = background);
  read with ``allow_pickle=False`` (nnU-Net's ``.pkl`` sidecar is never read);
- ``<case_id>.seg.nrrd``: a Slicer segmentation (its segment names label it);
- ``<case_id>.nii.gz`` / ``.nii`` / ``.nrrd`` / ``.mha``: a label map (x, y, z), or a 4-D
  probability map (x, y, z, C) whose channel c is label value c, or (C = number of labels)
  the c-th label of the table;
- ``<case_id>/<structure>.nii.gz``: one binary mask per structure (TotalSegmentator's default
  output without ``--ml``).

Label names come from ``labels.json`` or ``dataset.json`` in the folder, else from the run's
``data.labels_json``. Teacher structures are matched to the student's by name; the teacher may
segment more structures than the student. Outputs must lie on the case image's grid.
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

from mtkd.data.image_io import check_same_grid, describe_grid, itk_error_reason, read_label
from mtkd.data.labels import LabelTable, label_values_in, remap_label_array
from mtkd.data.preprocess import sitk_affine_ras
from mtkd.data.segnrrd import read_seg_nrrd
from mtkd.errors import MTKDError

__all__ = ["LABEL_FILES", "StoredOutputs", "TeacherMap", "match_by_name", "open_stored_outputs"]

LABEL_FILES = ("labels.json", "dataset.json")
_VOLUME_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha")
_MASK_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha")
_GENERATED_NAME = re.compile(r"^label_\d+$")
_PROBABILITY_TOLERANCE = 1e-3


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
        if path.is_dir():
            return self._read_masks(path, reference)
        name = path.name.lower()
        if name.endswith(".npz"):
            return self._read_npz(path, reference)
        if name.endswith(".seg.nrrd"):
            label, table = read_seg_nrrd(path)
            check_same_grid(label, reference, path)
            if self.labels is not None and all(_GENERATED_NAME.match(n) for n in table.names):
                table = self.labels  # a plain labelmap NRRD: names from the folder
            return self._label_map(sitk.GetArrayViewFromImage(label), table, reference, path)
        if _is_multichannel(path):
            return self._read_probability_image(path, reference)
        label = read_label(path, reference=reference)
        return self._label_map(
            sitk.GetArrayViewFromImage(label), self._table(path), reference, path
        )

    def _table(self, path: Path) -> LabelTable:
        if self.labels is None:
            raise MTKDError(
                "no label names for the stored teacher outputs: put a labels.json "
                '({"1": "spleen", ...}) or the tool\'s dataset.json next to them, or set '
                "data.labels_json",
                path,
            )
        return self.labels

    def _label_map(
        self, array: np.ndarray, table: LabelTable, reference: sitk.Image, path: Path
    ) -> TeacherMap:
        """A teacher label map (z, y, x) in the teacher's values -> student numbering."""
        unknown = [v for v in label_values_in(array) if v != 0 and v not in table]
        if unknown:
            raise MTKDError(
                f"teacher label map has values not in its label table: {unknown[:20]}", path
            )
        values = match_by_name(table, self.structures, path)
        mapping = {value: index for index, value in enumerate(values, start=1)}
        remapped = remap_label_array(np.asarray(array), mapping).transpose(2, 1, 0)
        tensor = torch.as_tensor(np.ascontiguousarray(remapped)).long()[None]
        return TeacherMap(_meta(tensor, reference), is_label_map=True)

    def _read_masks(self, folder: Path, reference: sitk.Image) -> TeacherMap:
        """One binary mask per structure, named after it (TotalSegmentator's default output)."""
        size = reference.GetSize()
        array = np.zeros((size[2], size[1], size[0]), dtype=np.uint16)
        missing = []
        for index, name in enumerate(self.structures.names, start=1):
            mask = next(
                (folder / f"{name}{e}" for e in _MASK_ENDINGS if (folder / f"{name}{e}").is_file()),
                None,
            )
            if mask is None:
                missing.append(name)
                continue
            voxels = sitk.GetArrayFromImage(read_label(mask, reference=reference))
            array[voxels > 0] = index
        if missing:
            raise MTKDError(
                f"the teacher does not segment {', '.join(missing)} (no mask file <name>.nii.gz)",
                folder,
            )
        tensor = torch.as_tensor(array.transpose(2, 1, 0).astype(np.int64))[None]
        return TeacherMap(_meta(tensor.contiguous(), reference), is_label_map=True)

    def _read_npz(self, path: Path, reference: sitk.Image) -> TeacherMap:
        try:
            with np.load(path, allow_pickle=False) as archive:
                if "probabilities" not in archive.files:
                    raise MTKDError(
                        f"no 'probabilities' array in the archive (it holds {archive.files})", path
                    )
                probabilities = np.asarray(archive["probabilities"])
        except (OSError, ValueError) as error:
            raise MTKDError(f"cannot read the probabilities ({error})", path) from None
        if probabilities.ndim != 4:
            raise MTKDError(
                f"probabilities must be (C, z, y, x), got shape {probabilities.shape}", path
            )
        expected = tuple(reversed(reference.GetSize()))
        if probabilities.shape[1:] != expected:
            raise MTKDError(
                f"probability grid differs from the case image: (z, y, x) "
                f"{probabilities.shape[1:]} vs {expected} [{describe_grid(reference)}]",
                path,
            )
        return self._probabilities(probabilities, reference, path)

    def _read_probability_image(self, path: Path, reference: sitk.Image) -> TeacherMap:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as error:
            raise MTKDError(f"cannot read image: {itk_error_reason(error)}", path) from None
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
        return self._probabilities(array, reference, path)

    def _probabilities(self, array: np.ndarray, reference: sitk.Image, path: Path) -> TeacherMap:
        """Probabilities (C, z, y, x) in the teacher's channels -> (K, X, Y, Z) of the student."""
        table = self._table(path)
        channels = len(array)
        values = match_by_name(table, self.structures, path)
        if channels == max(table.label_values) + 1:
            picked = values  # channel = label value, 0 = background
        elif channels == len(table):
            picked = [table.label_values.index(v) for v in values]  # table order, no background
        else:
            raise MTKDError(
                f"{channels} probability channels do not fit the {len(table)} labels (values up "
                f"to {max(table.label_values)}): expected {max(table.label_values) + 1} channels "
                f"(channel = label value) or {len(table)}",
                path,
            )
        selected = np.asarray(array[picked], dtype=np.float32)
        if not np.isfinite(selected).all():
            raise MTKDError("probability map has NaN or infinite values", path)
        low, high = (float(selected.min()), float(selected.max())) if selected.size else (0, 0)
        if low < -_PROBABILITY_TOLERANCE or high > 1 + _PROBABILITY_TOLERANCE:
            raise MTKDError(
                f"probability map has values from {low:g} to {high:g}, outside 0..1", path
            )
        tensor = torch.as_tensor(np.ascontiguousarray(selected.transpose(0, 3, 2, 1)))
        return TeacherMap(_meta(tensor.clamp(0.0, 1.0), reference), is_label_map=False)


def _is_multichannel(path: Path) -> bool:
    """True for a 4-D image with several volumes or a vector image (a probability map)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise MTKDError(f"cannot read image: {itk_error_reason(error)}", path) from None
    size = reader.GetSize()
    return reader.GetNumberOfComponents() > 1 or (len(size) == 4 and size[3] > 1)


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
