"""What a run trains on, recorded so that a resume on other data or another teacher is refused.

``RUN/fingerprint.json`` (written atomically when a run starts) holds:

- ``data``: the dataset's label table and, per case id, its patient id and the size and
  SHA-256 of its image and label file (of every file of a DICOM series folder);
- ``unlabelled`` (a distillation with ``distill.unlabelled`` a folder): per case id of that
  folder, its patient id and the size and SHA-256 of its image (null without such a folder;
  unlabelled training patients are cases of ``data``);
- ``teacher`` (distillation only): the kind of teacher and the size and SHA-256 of its files
  (the model folder's files, a MONAI bundle's, the checkpoint/TorchScript/ONNX file, or the
  stored outputs);
- ``anchor`` (a distillation with ``distill.anchor``): the size and SHA-256 of the parent
  model's files (null without an anchor; older fingerprints have no such key, which reads as
  null).

Content, not paths, is recorded: a run folder moved with its data to another machine still
resumes. The whole file is hashed (a size and a modification time can stay the same through an
edit, and a few sampled MB miss an edit in the middle of an uncompressed label map); SHA-256
reads about 1.3 GB/s on one core, a 512x512x100 CT (52 MB as raw .nrrd) in about 35 ms, less
than reading it with SimpleITK.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mtkd.data.atomic import TEMPORARY_PREFIX
from mtkd.data.datasets import Case, DatasetIndex
from mtkd.engine.teacher_source import teacher_kind
from mtkd.errors import MTKDError
from mtkd.folder_lock import LOCK_NAME
from mtkd.modelfiles.files import model_folder

__all__ = [
    "FINGERPRINT_FORMAT",
    "content_digest",
    "fingerprint_differences",
    "read_fingerprint",
    "run_fingerprint",
]

FINGERPRINT_FORMAT = 1
_CHUNK = 1 << 20
_SHOWN = 10  # names listed per kind of difference


def file_digest(path: Path) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of one file."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
        size = path.stat().st_size
    except OSError as error:
        raise MTKDError(
            f"cannot read it to record the run's data ({error.strerror})", path
        ) from None
    return {"size": size, "sha256": digest.hexdigest()}


def content_digest(path: str | Path) -> dict[str, Any]:
    """A file's :func:`file_digest`, or a folder's ``{"files": {relative path: digest}}``
    (every file below it, temporary and lock files left out)."""
    path = Path(path)
    if not path.is_dir():
        return file_digest(path)
    files = {
        child.relative_to(path).as_posix(): file_digest(child)
        for child in sorted(path.rglob("*"))
        if child.is_file() and not child.name.startswith((TEMPORARY_PREFIX, LOCK_NAME))
    }
    return {"files": files}


def data_fingerprint(dataset: DatasetIndex) -> dict[str, Any]:
    """The dataset's label table and each case's patient, image and label content, and the
    structures it does not annotate (only where there are some: older records stay equal)."""
    cases = {}
    for case in dataset.cases:
        cases[case.case_id] = {
            "patient": case.patient_id,
            "image": content_digest(case.image),
            "label": None if case.label is None else content_digest(case.label),
        }
        if case.not_annotated:
            cases[case.case_id]["not_annotated"] = list(case.not_annotated)
    return {"labels": dataset.labels.to_dict(), "cases": cases}


def unlabelled_fingerprint(cases: list[Case]) -> dict[str, Any]:
    """Each unlabelled case's patient and image content (labels are not used)."""
    return {
        case.case_id: {"patient": case.patient_id, "image": content_digest(case.image)}
        for case in cases
    }


def teacher_fingerprint(path: str | Path) -> dict[str, Any]:
    """The teacher's kind and the content of the files it is loaded from."""
    path = Path(path)
    kind = teacher_kind(path)
    if kind != "stored":
        path = model_folder(path)  # a run folder: its model, not its checkpoints and reports
    return {"kind": kind, "content": content_digest(path)}


def anchor_fingerprint(path: str | Path) -> dict[str, Any]:
    """The content of the anchor's model files (a run folder: its model)."""
    return {"kind": "run", "content": content_digest(model_folder(Path(path)))}


def run_fingerprint(
    dataset: DatasetIndex,
    teacher: str | Path | None,
    unlabelled: list[Case] | None = None,
    anchor: str | Path | None = None,
) -> dict[str, Any]:
    """What ``fingerprint.json`` holds for a run on ``dataset`` (and ``teacher``, the
    ``unlabelled`` cases of a folder of extra images, and the ``anchor``'s model)."""
    found = {
        "format": FINGERPRINT_FORMAT,
        "data": data_fingerprint(dataset),
        "unlabelled": None if unlabelled is None else unlabelled_fingerprint(unlabelled),
        "teacher": None if teacher is None else teacher_fingerprint(teacher),
    }
    if anchor is not None:  # no key without one: earlier fingerprints stay equal
        found["anchor"] = anchor_fingerprint(anchor)
    return found


def read_fingerprint(path: Path) -> dict[str, Any] | None:
    """A run's recorded fingerprint; None if it has none (made by an older mtkd)."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise MTKDError(
            f"unreadable ({error}); delete it to resume without checking the data", path
        ) from None
    if not isinstance(data, dict) or data.get("format") != FINGERPRINT_FORMAT:
        raise MTKDError(
            f"not a fingerprint of format {FINGERPRINT_FORMAT} (written by another mtkd "
            "version?); delete it to resume without checking the data",
            path,
        )
    return data


def fingerprint_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What changed between two fingerprints, in words (empty: nothing)."""
    return (
        _data_differences(recorded.get("data") or {}, current.get("data") or {})
        + _case_differences(
            recorded.get("unlabelled") or {}, current.get("unlabelled") or {}, "unlabelled image"
        )
        + _teacher_differences(recorded.get("teacher"), current.get("teacher"))
        + _teacher_differences(recorded.get("anchor"), current.get("anchor"), "anchor")
    )


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def _data_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    differences = []
    if old.get("labels") != new.get("labels"):
        differences.append(f"label table {old.get('labels')} is now {new.get('labels')}")
    return differences + _case_differences(old.get("cases") or {}, new.get("cases") or {})


def _case_differences(
    old_cases: dict[str, Any], new_cases: dict[str, Any], what: str = "case"
) -> list[str]:
    """Cases added, removed and changed (which of image, label, patient), in words."""
    differences = []
    added = sorted(set(new_cases) - set(old_cases))
    removed = sorted(set(old_cases) - set(new_cases))
    changed = []
    for case_id in sorted(set(old_cases) & set(new_cases)):
        parts = [
            part
            for part in ("image", "label", "patient", "not_annotated")
            if old_cases[case_id].get(part) != new_cases[case_id].get(part)
        ]
        if parts:
            changed.append(f"{case_id} ({', '.join(parts)})")
    for change, names in (("added", added), ("removed", removed), ("changed", changed)):
        if names:
            differences.append(f"{what}(s) {change}: {_names(names)}")
    return differences


def _teacher_differences(
    old: dict[str, Any] | None, new: dict[str, Any] | None, what: str = "teacher"
) -> list[str]:
    """How the teacher (or the anchor, ``what``) changed, in words."""
    if old == new:
        return []
    if old is None or new is None:
        return [f"the {what} changed ({_kind(old)} -> {_kind(new)})"]
    if old.get("kind") != new.get("kind"):
        return [f"the {what} changed (a {_kind(old)} {what} is now a {_kind(new)} one)"]
    a, b = old.get("content") or {}, new.get("content") or {}
    if "files" not in a or "files" not in b:
        return [
            f"the {what} changed (its file's SHA-256 {str(a.get('sha256'))[:12]}... is now "
            f"{str(b.get('sha256'))[:12]}...)"
        ]
    files_a, files_b = a["files"], b["files"]
    parts = []
    for change, names in (
        ("added", sorted(set(files_b) - set(files_a))),
        ("removed", sorted(set(files_a) - set(files_b))),
        ("changed", sorted(n for n in set(files_a) & set(files_b) if files_a[n] != files_b[n])),
    ):
        if names:
            parts.append(f"{change} {_names(names)}")
    return [f"the {what} changed (its files: {'; '.join(parts)})"]


def _kind(fingerprint: dict[str, Any] | None) -> str:
    return "no" if fingerprint is None else str(fingerprint.get("kind"))
