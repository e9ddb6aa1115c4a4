"""A training set from what the user has in the scene, written as a dataset the engine reads
(no Qt).

Pairs of a CT volume node and a segmentation node become an MSD-layout folder::

    DATASET/dataset.json          labels {"0": "background", "1": ...}, training image/label pairs
    DATASET/imagesTr/<case>.nii.gz
    DATASET/labelsTr/<case>.nii.gz
    DATASET/mtkd_cases.json       where each case came from, who added it and when, its patient

so the same run can be repeated from the command line (``mtkd distill`` with
``data.source: DATASET``). Segments are matched to structures by terminology code, then by name
through the dataset's alias table and MTKD's built-in aliases (:mod:`MTKDLib.segment_labels`;
case, spaces and hyphens do not matter); a case that misses a structure, or names one
differently, is reported before anything is written. A segment marked not annotated is
recorded in ``dataset.json`` (``mtkd.not_annotated``) instead of being drawn as empty.

One writer at a time: adding a case holds the dataset folder's lock (:func:`dataset_lock`,
:mod:`mtkd.folder_lock`, waiting a little for another writer and recovering the lock of one
that died). A case id is new against every file on disk; the image and label map are written
under temporary names and renamed; then the case's record is written, then ``dataset.json``.
A crash between the two leaves a record that ``dataset.json`` lacks, which :meth:`TrainingSet.
repair` (run by every write) lists again.
"""

from __future__ import annotations

import contextlib
import difflib
import getpass
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk

from mtkd.data.atomic import atomic_write_bytes, temporary_sibling
from mtkd.data.labels import LabelTable
from mtkd.data.partial_labels import read_aliases, with_not_annotated
from mtkd.data.structure_match import segment_key
from mtkd.data.terminology import normalize_name
from mtkd.folder_lock import FolderLock
from MTKDLib.mrml_io import segment_names, segments_labelmap_array, write_volume
from MTKDLib.segment_labels import match_case, segment_label

DATASET_JSON = "dataset.json"
CASES_JSON = "mtkd_cases.json"
LOCK_TIMEOUT = 30.0  # seconds a writer waits for another one (adding a case takes seconds)
_SUBFOLDERS = ("imagesTr", "labelsTr")
_HELD: dict[Path, int] = {}  # dataset folders whose lock this process holds -> depth


@dataclass
class SceneCase:
    """One training case in the scene: a CT volume and its segmentation."""

    volume: Any  # vtkMRMLScalarVolumeNode
    segmentation: Any  # vtkMRMLSegmentationNode
    case_id: str | None = None  # default: from the volume's name

    @property
    def name(self) -> str:
        return self.case_id or self.volume.GetName()


@dataclass
class LabelPlan:
    """One label table for all cases, and what does not fit it.

    ``structures``: the label names, value = position + 1. ``missing``: case name -> the
    structures it lacks. ``renamed``: messages about names that look like another case's name
    for the same structure. ``ambiguous``: messages about segments that fit a structure twice
    over. ``common``: the structures every case has.
    """

    structures: list[str]
    common: list[str]
    missing: dict[str, list[str]] = field(default_factory=dict)
    renamed: list[str] = field(default_factory=list)
    ambiguous: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        """Every problem as a sentence naming the case (empty when all cases agree)."""
        lines = [
            f"case '{case}' has no segment for: {', '.join(names)}"
            for case, names in self.missing.items()
        ]
        return lines + self.renamed + self.ambiguous


def _case_names(case: SceneCase) -> dict[str, str]:
    """{normalised name: name as written} of a case's segments."""
    return {normalize_name(name): name for name in segment_names(case.segmentation)}


def _first_seen_structures(cases: Sequence[SceneCase], aliases: dict) -> list[str]:
    """Every structure any case has, by its first-seen segment name; segments that are one
    structure (same code, an alias) count once (:func:`mtkd.data.structure_match.segment_key`)."""
    seen: dict[str, str] = {}
    for case in cases:
        segmentation = case.segmentation.GetSegmentation()
        for index in range(segmentation.GetNumberOfSegments()):
            label = segment_label(segmentation.GetNthSegment(index))
            seen.setdefault(segment_key(label, aliases), label.name)
    return list(seen.values())


def plan_labels(
    cases: Sequence[SceneCase],
    structures: Sequence[str] | None = None,
    aliases: dict[str, Sequence[str]] | None = None,
) -> LabelPlan:
    """The label table for ``cases``: ``structures`` when given, else every structure any case
    has (in first-seen order); with the cases that miss one and the names that look misspelt.
    Segments are matched by code, then by name through ``aliases`` (:func:`match_case`); a
    segment marked not annotated counts as present."""
    if not cases:
        raise ValueError("add at least one case (a CT volume and its segmentation)")
    aliases = aliases or {}
    per_case = {case.name: _case_names(case) for case in cases}
    wanted = list(structures) if structures is not None else _first_seen_structures(cases, aliases)
    keys = [normalize_name(name) for name in wanted]
    missing, ambiguous = {}, []
    for case in cases:
        try:
            match = match_case(case.segmentation, wanted, aliases)
        except ValueError as error:  # two segments for one structure, or one for two
            ambiguous.append(f"case '{case.name}': {error}")
            continue
        if match.missing:
            missing[case.name] = match.missing
    common = [name for name in wanted if not any(name in names for names in missing.values())]
    renamed = []
    for case, names in per_case.items():
        for name, key in zip(wanted, keys, strict=True):
            if name not in missing.get(case, ()):
                continue
            close = difflib.get_close_matches(key, [k for k in names if k not in keys], 1, 0.75)
            if close:
                renamed.append(
                    f"case '{case}' has a segment '{names[close[0]]}' but no '{name}': "
                    f"if they are the same structure, rename the segment to '{name}'"
                )
    return LabelPlan(wanted, common, missing, renamed, ambiguous)


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")
    return slug or "case"


def _labelmap_node(
    case: SceneCase, structures: Sequence[str], aliases: dict[str, Sequence[str]]
) -> tuple[Any, list[str]]:
    """A temporary labelmap node on the CT's grid, value k+1 = ``structures[k]`` (segments
    matched by code, then name, :func:`match_case`), and the structures the case marks not
    annotated (0 in the map, whatever their segments hold). ValueError for a missing one."""
    match = match_case(case.segmentation, structures, aliases)
    if match.missing:
        raise ValueError(f"case '{case.name}' has no segment for: {', '.join(match.missing)}")
    values = {match.segment_ids[name]: structures.index(name) + 1 for name in match.segment_ids}
    array = segments_labelmap_array(case.segmentation, case.volume, values).astype(np.uint16)
    scene = case.volume.GetScene()
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    matrix = vtk.vtkMatrix4x4()
    case.volume.GetIJKToRASMatrix(matrix)
    node.SetIJKToRASMatrix(matrix)
    slicer.util.updateVolumeFromArray(node, array)
    return node, match.not_annotated


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: unreadable ({error})") from None


def _write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


@contextlib.contextmanager
def dataset_lock(folder: str | Path, purpose: str = "MTKD Train") -> Iterator[None]:
    """Hold the dataset folder's lock (``FOLDER/.mtkd.lock``) for the block: one writer at a
    time across processes. Waits up to :data:`LOCK_TIMEOUT` s for another writer
    (FolderLocked naming it after that); a lock whose holder died is recovered. Re-entrant
    within this process, so a step that holds it can call others that take it."""
    key = Path(folder).absolute()
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    with FolderLock(key, purpose).acquire(timeout=LOCK_TIMEOUT):
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]


def _case_of_entry(entry: dict[str, Any]) -> str:
    """The case id of a ``dataset.json`` training entry (its image file's name)."""
    return _file_case(Path(str(entry.get("image", ""))).name)


def _file_case(name: str) -> str:
    """The case id a file name in imagesTr/labelsTr takes (``case.nii.gz`` -> ``case``)."""
    return name.split(".", 1)[0]


class TrainingSet:
    """An MSD-layout dataset folder that grows case by case (see the module docstring)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @property
    def exists(self) -> bool:
        return (self.folder / DATASET_JSON).is_file()

    def lock(self, purpose: str = "MTKD Train") -> contextlib.AbstractContextManager[None]:
        """This folder's writer lock (:func:`dataset_lock`)."""
        return dataset_lock(self.folder, purpose)

    def structures(self) -> list[str]:
        """The label names, in label-value order (MSD or nnU-Net v2 ``labels``)."""
        path = self.folder / DATASET_JSON
        return LabelTable.from_msd(_read_json(path), path).names

    def aliases(self) -> dict[str, tuple[str, ...]]:
        """Other names of the structures (``mtkd.aliases`` in dataset.json)."""
        path = self.folder / DATASET_JSON
        data = _read_json(path)
        return read_aliases(data, LabelTable.from_msd(data, path), path)

    def records(self) -> list[dict[str, Any]]:
        """Where each case came from, who added it and when, its patient (``mtkd_cases.json``)."""
        path = self.folder / CASES_JSON
        return _read_json(path)["cases"] if path.is_file() else []

    def case_ids(self) -> list[str]:
        return [record["case"] for record in self.records()]

    def patients(self) -> dict[str, str]:
        """case id -> patient id (the case itself where none was given)."""
        return {r["case"]: str(r.get("patient") or r["case"]) for r in self.records()}

    def create(self, structures: Sequence[str], name: str = "MTKD training set") -> None:
        """Start an empty dataset with these label names (refuses to overwrite one)."""
        if not structures:
            raise ValueError("a training set needs at least one structure")
        with self.lock("MTKD Train (creating the training set)"):
            if self.exists:
                raise ValueError(f"{self.folder}: a training set is already there")
            for sub in ("imagesTr", "labelsTr"):
                (self.folder / sub).mkdir(parents=True, exist_ok=True)
            labels = {"0": "background", **{str(i + 1): s for i, s in enumerate(structures)}}
            dataset = {"name": name, "description": "written by MTKD from 3D Slicer",
                       "modality": {"0": "CT"}, "labels": labels, "numTraining": 0,
                       "training": []}  # fmt: skip
            _write_json(self.folder / CASES_JSON, {"cases": []})
            _write_json(self.folder / DATASET_JSON, dataset)

    def taken_ids(self) -> set[str]:
        """Every case id in use: recorded, listed in ``dataset.json``, or a file on disk."""
        taken = set(self.case_ids())
        taken |= {_case_of_entry(e) for e in _read_json(self.folder / DATASET_JSON)["training"]}
        for sub in ("imagesTr", "labelsTr"):
            folder = self.folder / sub
            if folder.is_dir():
                taken |= {_file_case(p.name) for p in folder.iterdir() if p.name[:1] != "."}
        return taken

    def add(
        self,
        case: SceneCase,
        added_by: str | None = None,
        note: str = "",
        patient: str | None = None,
        part: str | None = None,
    ) -> str:
        """Write ``case`` (CT and label map on its grid) into the dataset; returns its case id.

        The case must have a segment for every structure of the dataset (ValueError naming
        the case and what is missing or misnamed otherwise). ``patient``: its patient id
        (default: the case itself); the engine splits by it. ``part``: where a loop keeps it
        (``"test"``: out of training; :mod:`MTKDLib.distill_loop`). Holds the folder's lock;
        the case id is new against everything on disk; the files are written under temporary
        names first, then the record, then ``dataset.json`` (see :meth:`repair`).
        """
        structures, aliases = self.structures(), self.aliases()
        plan = plan_labels([case], structures, aliases)
        if plan.problems:
            raise ValueError("; ".join(plan.problems))
        with self.lock("MTKD Train (adding a case)"):
            self.repair()
            taken = self.taken_ids()
            base = _slug(case.name)
            case_id, number = base, 2
            while case_id in taken:
                case_id, number = f"{base}_{number}", number + 1
            image = self.folder / "imagesTr" / f"{case_id}.nii.gz"
            label = self.folder / "labelsTr" / f"{case_id}.nii.gz"
            not_annotated = self._write_files(case, structures, aliases, image, label)
            record = {
                "case": case_id,
                "patient": str(patient).strip() if patient and str(patient).strip() else case_id,
                "volume": case.volume.GetName(),
                "segmentation": case.segmentation.GetName(),
                "added_by": added_by or getpass.getuser(),
                "added_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "note": note,
            }
            if part:
                record["part"] = part
            if not_annotated:  # kept in the record too, so a repaired dataset.json has it
                record["not_annotated"] = list(not_annotated)
            _write_json(self.folder / CASES_JSON, {"cases": [*self.records(), record]})
            write_dataset_json(self.folder, self._listed_with(record))
        return case_id

    def _write_files(
        self,
        case: SceneCase,
        structures: list[str],
        aliases: dict[str, list[str]],
        image: Path,
        label: Path,
    ) -> list[str]:
        """The CT and its label map, each under a temporary name renamed into place; returns
        the structures the case marks not annotated."""
        temporary = [temporary_sibling(image), temporary_sibling(label)]
        try:
            write_volume(case.volume, temporary[0], compress=True)
            labelmap, not_annotated = _labelmap_node(case, structures, aliases)
            try:
                write_volume(labelmap, temporary[1], compress=True)
            finally:
                labelmap.GetScene().RemoveNode(labelmap)
            for source, target in zip(temporary, (image, label), strict=True):
                if target.exists():  # never overwrite: the id was checked under the lock
                    raise FileExistsError(f"{target}: appeared while the case was written")
                os.replace(source, target)
        finally:
            for path in temporary:
                path.unlink(missing_ok=True)
        return not_annotated

    def _listed_with(self, record: dict[str, Any]) -> dict[str, Any]:
        dataset = _read_json(self.folder / DATASET_JSON)
        case_id = record["case"]
        dataset["training"].append(
            {
                "image": f"./imagesTr/{case_id}.nii.gz",
                "label": f"./labelsTr/{case_id}.nii.gz",
                "patient": record.get("patient") or case_id,
            }  # fmt: skip
        )
        dataset["numTraining"] = len(dataset["training"])
        if record.get("not_annotated"):
            dataset = with_not_annotated(dataset, case_id, record["not_annotated"])
        return dataset

    def repair(self) -> list[str]:
        """Make ``dataset.json`` and the records agree after a write was interrupted: a
        recorded case whose files are there is listed again, a listed case without a record
        gets one. Holds the lock; returns a sentence per case repaired (empty: nothing to do)."""
        if not self.exists:
            return []
        done = []
        with self.lock("MTKD Train (repairing the training set)"):
            records = self.records()
            recorded = {r["case"] for r in records}
            listed = {_case_of_entry(e) for e in _read_json(self.folder / DATASET_JSON)["training"]}
            for entry in _read_json(self.folder / DATASET_JSON)["training"]:
                case_id = _case_of_entry(entry)
                if case_id not in recorded:
                    records.append({"case": case_id, "patient": entry.get("patient") or case_id,
                                    "added_by": "", "added_at": "", "note": "record restored "
                                    "after an interrupted write"})  # fmt: skip
                    done.append(f"case '{case_id}': its record was restored")
            if done:
                _write_json(self.folder / CASES_JSON, {"cases": records})
            for record in records:
                case_id = record["case"]
                files = [self.folder / sub / f"{case_id}.nii.gz" for sub in _SUBFOLDERS]
                if case_id not in listed and all(path.is_file() for path in files):
                    write_dataset_json(self.folder, self._listed_with(record))
                    done.append(f"case '{case_id}': listed in {DATASET_JSON} again")
        return done


def write_dataset_json(folder: Path, dataset: dict[str, Any]) -> None:
    """Write ``FOLDER/dataset.json`` (atomically)."""
    _write_json(Path(folder) / DATASET_JSON, dataset)


def dataset_summary(folder: str | Path) -> str:
    """One line on a dataset folder as the engine reads it (layout, cases, structures), or
    what is wrong with it."""
    from mtkd.data.datasets import load_dataset
    from mtkd.errors import MTKDError

    try:
        dataset = load_dataset(folder)
    except MTKDError as error:
        return f"not a dataset the engine reads: {error}"
    labelled = sum(case.label is not None for case in dataset.cases)
    return (
        f"{dataset.layout} dataset: {len(dataset.cases)} cases ({labelled} labelled); "
        f"structures: {', '.join(dataset.labels.names)}"
    )


def chosen_folder(folder: str | Path | None, what: str = "dataset folder") -> Path:
    """``folder`` as a Path, or ValueError when none was chosen: empty or ``.`` (what an
    empty path field gives, e.g. ``Path("")``), or a relative path. Either would be read or
    written in the application's working directory, not where the user meant."""
    text = "" if folder is None else str(folder).strip()
    if text in ("", "."):
        raise ValueError(f"choose the {what} first")
    path = Path(text).expanduser()
    if not path.is_absolute():
        raise ValueError(f"the {what} '{text}' is not a full path: choose the folder")
    return path


def export_training_set(
    cases: Sequence[SceneCase],
    folder: str | Path,
    structures: Sequence[str] | None = None,
    added_by: str | None = None,
) -> TrainingSet:
    """Write ``cases`` as a new dataset in ``folder`` with one label table.

    ``folder`` must be chosen (see :func:`chosen_folder`). ``structures`` default: every
    structure of any case. ValueError before anything is written when a case misses one of
    them or names one differently (the message lists each problem; pass
    ``plan_labels(cases).common`` to keep only what every case has).
    """
    folder = chosen_folder(folder)
    plan = plan_labels(cases, structures)
    if plan.problems:
        raise ValueError("the cases do not agree on their structures:\n" + "\n".join(plan.problems))
    training_set = TrainingSet(folder)
    training_set.create(plan.structures)
    for case in cases:
        training_set.add(case, added_by=added_by, note="exported from the scene")
    return training_set
