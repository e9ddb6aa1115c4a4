"""Dataset readers: MSD / nnU-Net folders, image/label folder pairs, one image, one DICOM series.

``load_dataset`` only indexes files (it reads label maps only when label names must be taken
from the values found in them); images are read later by :mod:`mtkd.data.image_io`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mtkd.data.image_io import (
    IMAGE_SUFFIXES,
    checked_reader,
    dicom_series_ids,
    image_suffix,
    read_label,
    strip_image_suffix,
)
from mtkd.data.labels import LabelTable, label_values_in
from mtkd.data.partial_labels import read_aliases, read_not_annotated
from mtkd.errors import MTKDError

__all__ = ["LAYOUTS", "Case", "DatasetIndex", "load_dataset", "load_unlabelled"]

LAYOUTS = ("msd", "nnunet", "folders", "single", "dicom")
_PAIR_FOLDERS = (("images", "labels"), ("imagesTr", "labelsTr"))
_CHANNEL = "_0000"


@dataclass
class Case:
    """One CT with its optional label map; ``image`` is a file or a DICOM series folder.

    ``not_annotated``: structures (label-table names) nobody drew in this case; their voxels
    are unknown, not background (:mod:`mtkd.data.partial_labels`)."""

    case_id: str
    image: Path
    label: Path | None = None
    patient_id: str = ""
    not_annotated: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.image = Path(self.image)
        self.label = None if self.label is None else Path(self.label)
        if not self.patient_id:
            self.patient_id = self.case_id


@dataclass
class DatasetIndex:
    """The cases of a dataset (sorted by case id), its label table and the detected layout.

    ``layout`` is one of ``msd``, ``nnunet``, ``folders``, ``single``, ``dicom``;
    ``aliases``: other names of the structures (``mtkd.aliases`` in dataset.json).
    """

    root: Path
    cases: list[Case]
    labels: LabelTable
    layout: str
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def case(self, case_id: str) -> Case:
        """The case called ``case_id`` (MTKDError if unknown)."""
        for case in self.cases:
            if case.case_id == case_id:
                return case
        raise MTKDError(f"no case '{case_id}' in this dataset", self.root)


def _case_id(path: Path) -> str:
    name = strip_image_suffix(path.name)
    return name[: -len(_CHANNEL)] if name.endswith(_CHANNEL) else name


def _image_files(folder: Path, ending: str | None = None) -> list[Path]:
    """Image files in ``folder`` (hidden files such as macOS ``._x.nii.gz`` skipped), sorted."""
    files = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        if ending is not None:
            if entry.name.endswith(ending):
                files.append(entry)
        elif image_suffix(entry) is not None:
            files.append(entry)
    return files


def _check_unique(cases: Iterable[Case], root: Path) -> list[Case]:
    by_id: dict[str, Case] = {}
    for case in cases:
        if case.case_id in by_id:
            raise MTKDError(
                f"duplicate case id '{case.case_id}' ({by_id[case.case_id].image.name} and "
                f"{case.image.name})",
                root,
            )
        by_id[case.case_id] = case
    if not by_id:
        raise MTKDError("dataset has no cases", root)
    return sorted(by_id.values(), key=lambda c: c.case_id)


def _list_names(paths: list[Path], limit: int = 10) -> str:
    names = [p.name for p in paths[:limit]]
    return ", ".join(names) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _pair_by_name(images: list[Path], labels: list[Path], root: Path) -> list[Case]:
    """Match images and labels by case id (file name without extension and ``_0000``)."""
    label_by_id: dict[str, Path] = {}
    for label in labels:
        case_id = strip_image_suffix(label.name)
        if case_id in label_by_id:
            raise MTKDError(
                f"two label files for case '{case_id}': {label_by_id[case_id].name}, {label.name}",
                root,
            )
        label_by_id[case_id] = label
    image_ids = {_case_id(image): image for image in images}
    missing_label = [image for case_id, image in image_ids.items() if case_id not in label_by_id]
    if missing_label:
        raise MTKDError(f"image(s) without a label map: {_list_names(missing_label)}", root)
    missing_image = [label for case_id, label in label_by_id.items() if case_id not in image_ids]
    if missing_image:
        raise MTKDError(f"label map(s) without an image: {_list_names(missing_image)}", root)
    return [Case(_case_id(image), image, label_by_id[_case_id(image)]) for image in images]


def _read_dataset_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MTKDError(f"not valid JSON ({error})", path) from None
    if not isinstance(data, dict):
        raise MTKDError("dataset.json must hold a JSON object", path)
    return data


def _resolve(root: Path, relative: Any, what: str, json_path: Path) -> Path:
    if not isinstance(relative, str) or not relative:
        raise MTKDError(f"{what} path must be a non-empty string, got {relative!r}", json_path)
    path = Path(os.path.normpath(root / relative))
    if not path.exists():
        raise MTKDError(f"{what} file listed in dataset.json not found: {relative}", path)
    return path


def _msd_cases(
    root: Path, data: Mapping[str, Any], json_path: Path, labelled: bool = True
) -> list[Case]:
    """The ``training`` entries; without ``labelled`` their labels are neither needed nor
    read (images only)."""
    training = data["training"]
    if not isinstance(training, list):
        raise MTKDError("'training' in dataset.json must be a list", json_path)
    cases = []
    for number, entry in enumerate(training):
        if isinstance(entry, str):
            entry = {"image": entry}
        if not isinstance(entry, Mapping) or "image" not in entry:
            raise MTKDError(f"training entry {number} has no 'image': {entry!r}", json_path)
        image = _resolve(root, entry["image"], "image", json_path)
        patient = entry.get("patient", entry.get("patient_id"))
        patient_id = "" if patient is None else str(patient)
        if not labelled:
            cases.append(Case(_case_id(image), image, None, patient_id))
            continue
        if not entry.get("label"):
            raise MTKDError(
                f"image without a label map in dataset.json training entry {number}", image
            )
        label = _resolve(root, entry["label"], "label", json_path)
        cases.append(Case(_case_id(image), image, label, patient_id))
    return cases


def _nnunet_cases(root: Path, data: Mapping[str, Any], json_path: Path) -> list[Case]:
    channels = data.get("channel_names", data.get("modality", {"0": "CT"}))
    if isinstance(channels, Mapping) and len(channels) > 1:
        raise MTKDError(
            f"dataset has {len(channels)} input channels "
            f"({', '.join(map(str, channels.values()))}); MTKD uses one CT channel",
            json_path,
        )
    ending = data.get("file_ending", ".nii.gz")
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise MTKDError(
                "folder not found (nnU-Net raw layout needs imagesTr/ and labelsTr/)", folder
            )
    images = _image_files(images_dir, ending)
    wrong = [p for p in images if not p.name.endswith(_CHANNEL + ending)]
    if wrong:
        raise MTKDError(
            f"image file(s) without the '{_CHANNEL}{ending}' channel suffix: {_list_names(wrong)}",
            images_dir,
        )
    return _pair_by_name(images, _image_files(labels_dir, ending), root)


def _labels_from_maps(cases: list[Case]) -> LabelTable:
    values: set[int] = set()
    for case in cases:
        if case.label is not None:
            values.update(label_values_in(read_label(case.label)))
    return LabelTable.from_label_values(values)


def _table(
    cases: list[Case], data: Mapping[str, Any] | None, json_path: Path | None, labels_json: Any
) -> LabelTable:
    """Names from dataset.json ``labels``, else ``labels_json``, else the values in the maps."""
    if data is not None and data.get("labels"):
        return LabelTable.from_msd(data, json_path)
    if labels_json is not None:
        return LabelTable.from_json(labels_json)
    if any(case.label is not None for case in cases):
        return _labels_from_maps(cases)
    return LabelTable()


def _single_label(label: str | Path | None) -> Path | None:
    if label is None:
        return None
    label = Path(label)
    if not label.is_file():
        raise MTKDError("label file not found", label)
    return label


def load_dataset(
    path: str | Path, labels_json: str | Path | None = None, label: str | Path | None = None
) -> DatasetIndex:
    """Index the dataset at ``path``, detecting its layout.

    - MSD: ``dataset.json`` with a ``training`` list of ``{"image", "label"}`` paths relative to
      the folder (optional ``"patient"`` per entry);
    - nnU-Net raw: ``dataset.json`` without ``training``; ``imagesTr/<case>_0000<file_ending>``
      and ``labelsTr/<case><file_ending>``;
    - folder pairs: ``images/`` and ``labels/`` (or ``imagesTr/`` and ``labelsTr/``) matched by
      file name (any of .nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd);
    - a single image file, with ``label`` as its optional label map;
    - a folder holding one DICOM series (one case; ``label`` optional).

    ``labels_json`` names the structures when dataset.json has no ``labels``. A dataset.json
    may also list, per case, the structures it does not annotate, and other names of the
    structures (its ``"mtkd"`` key, :mod:`mtkd.data.partial_labels`).
    """
    path = Path(path)
    if not path.exists():
        raise MTKDError("dataset file or folder not found", path)
    return _load(path, labels_json, label)


def _refuse_label(label: str | Path | None, path: Path) -> None:
    if label is not None:
        raise MTKDError("label= is only for a single image file or a DICOM series folder", path)


def _load(path: Path, labels_json: str | Path | None, label: str | Path | None) -> DatasetIndex:
    if path.is_file():
        if image_suffix(path) is None:
            raise MTKDError(f"not an image file; expected one of {', '.join(IMAGE_SUFFIXES)}", path)
        checked_reader(path)  # an unreadable image is named now, not after a split of it
        case = Case(_case_id(path), path, _single_label(label))
        return DatasetIndex(path, [case], _table([case], None, None, labels_json), "single")

    json_path = path / "dataset.json"
    if json_path.is_file():
        _refuse_label(label, path)
        data = _read_dataset_json(json_path)
        if "training" in data:
            cases, layout = _msd_cases(path, data, json_path), "msd"
        else:
            cases, layout = _nnunet_cases(path, data, json_path), "nnunet"
        cases = _check_unique(cases, path)
        table = _table(cases, data, json_path, labels_json)
        unknown = read_not_annotated(data, table, [case.case_id for case in cases], json_path)
        cases = [replace(case, not_annotated=unknown.get(case.case_id, ())) for case in cases]
        return DatasetIndex(path, cases, table, layout, read_aliases(data, table, json_path))

    for images_name, labels_name in _PAIR_FOLDERS:
        images_dir, labels_dir = path / images_name, path / labels_name
        if images_dir.is_dir() or labels_dir.is_dir():
            _refuse_label(label, path)
            for folder in (images_dir, labels_dir):
                if not folder.is_dir():
                    raise MTKDError(f"folder not found (needed next to {images_name}/)", folder)
            cases = _pair_by_name(_image_files(images_dir), _image_files(labels_dir), path)
            cases = _check_unique(cases, path)
            return DatasetIndex(path, cases, _table(cases, None, None, labels_json), "folders")

    series = dicom_series_ids(path)
    if len(series) > 1:
        raise MTKDError(
            f"folder holds {len(series)} DICOM series ({', '.join(series)}); "
            "put each series in its own folder",
            path,
        )
    if series:
        case = Case(path.name or "dicom", path, _single_label(label))
        return DatasetIndex(path, [case], _table([case], None, None, labels_json), "dicom")
    raise MTKDError(
        "not a dataset: expected dataset.json, images/ and labels/ folders, an image file "
        "or a DICOM series",
        path,
    )


def load_unlabelled(path: str | Path) -> list[Case]:
    """The images at ``path`` as cases without labels (sorted by case id), for teacher targets.

    ``path`` is a dataset in any layout :func:`load_dataset` reads (an MSD ``dataset.json``'s
    ``training`` images; nnU-Net ``imagesTr/``; ``images/`` or ``imagesTr/``, with or without
    the label folder beside it), a folder of image files, one image file or a DICOM series
    folder. Label maps are never read.
    """
    path = Path(path)
    if not path.exists():
        raise MTKDError("folder of unlabelled images not found", path)
    if path.is_file():
        return _check_unique(_load(path, None, None).cases, path)
    json_path = path / "dataset.json"
    if json_path.is_file():
        data = _read_dataset_json(json_path)
        if "training" in data:
            return _check_unique(_msd_cases(path, data, json_path, labelled=False), path)
        ending = data.get("file_ending", ".nii.gz")
        images = _image_files(path / "imagesTr", ending) if (path / "imagesTr").is_dir() else []
        return _unlabelled_cases(images, path)
    for images_name, _ in _PAIR_FOLDERS:
        if (path / images_name).is_dir():
            return _unlabelled_cases(_image_files(path / images_name), path)
    images = _image_files(path)
    if images:
        return _unlabelled_cases(images, path)
    if dicom_series_ids(path):
        return _load(path, None, None).cases
    raise MTKDError(
        "no images here: expected a dataset (dataset.json, images/), image files or a DICOM series",
        path,
    )


def _unlabelled_cases(images: list[Path], root: Path) -> list[Case]:
    return _check_unique((Case(_case_id(image), image) for image in images), root)
