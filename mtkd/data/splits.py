"""Patient-level train/val/test splits and the student's training subset.

All cases of one patient land in the same split. The assignment depends only on the seed and
the set of patient ids (a keyed hash orders the patients), not on the input order, the Python
version or the platform. For one seed, a smaller ``student_fraction`` picks a subset of the
patients a larger one picks.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtkd.data.datasets import Case
from mtkd.errors import MTKDError, one_line

__all__ = ["Split", "read_split", "split_cases"]

_PARTS = ("train", "val", "test")


@dataclass
class Split:
    """Case ids per split; ``student_train`` is a subset of ``train`` (all of it by default)."""

    train: list[str]
    val: list[str]
    test: list[str]
    student_train: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.student_train:
            self.student_train = list(self.train)

    def to_dict(self) -> dict[str, list[str]]:
        """JSON-ready ``{"train": [...], "val": [...], "test": [...], "student_train": [...]}``."""
        return {
            "train": list(self.train),
            "val": list(self.val),
            "test": list(self.test),
            "student_train": list(self.student_train),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | Path | None = None) -> Split:
        """Inverse of :meth:`to_dict`; a missing ``student_train`` means all of ``train``.
        MTKDError naming ``source`` (the split file) for anything else."""
        lists = _checked_lists(data, source)
        split = cls(**{key: lists.get(key, []) for key in (*_PARTS, "student_train")})
        outside = sorted(set(split.student_train) - set(split.train))
        if outside:
            raise MTKDError(
                f"student_train holds cases not in train: {_listed(outside)}", path=source
            )
        return split


def _checked_lists(data: Any, source: str | Path | None) -> dict[str, list[str]]:
    """The lists of a split mapping, checked: known keys only, each a list of case ids
    (text), none twice, no case in two of train/val/test."""
    if not isinstance(data, Mapping):
        raise MTKDError(
            'a split must be a JSON object of case-id lists ({"train": [...], "val": '
            f'[...], "test": [...]}}), got {_kind(data)}',
            path=source,
        )
    known = (*_PARTS, "student_train")
    unknown = sorted(str(key) for key in data if key not in known)
    if unknown:
        raise MTKDError(
            f"unknown split key(s) {_listed(unknown)}; known: {', '.join(known)}", path=source
        )
    lists: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for key in known:
        if key not in data:
            continue
        value = data[key]
        if not isinstance(value, (list, tuple)):
            raise MTKDError(
                f"split '{key}' must be a list of case ids, got {_kind(value)}", path=source
            )
        for index, case_id in enumerate(value):
            if not isinstance(case_id, str) or not case_id:
                raise MTKDError(
                    f"split '{key}'[{index}] must be a case id (non-empty text), got "
                    f"{_kind(case_id)}",
                    path=source,
                )
        seen = owner if key != "student_train" else {}  # student_train repeats train's
        for case_id in value:
            if case_id in seen:
                where = seen[case_id]
                twice = "twice in" if where == key else f"in both '{where}' and"
                raise MTKDError(
                    f"case '{one_line(case_id, 60)}' is listed {twice} '{key}'", path=source
                )
            seen[case_id] = key
        lists[key] = list(value)
    return lists


def _kind(value: Any) -> str:
    """A short description of a JSON value for messages: ``a number (3)``, ``text 'abc'``."""
    if isinstance(value, str):
        return f"text {one_line(repr(value), 40)}"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


def _listed(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(one_line(name, 60) for name in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


MAX_SPLIT_BYTES = 64 * 2**20


def read_split(path: str | Path, require: Iterable[str] = ()) -> Split:
    """The split in a split file (a run's ``split.json``: ``{"train": [...], "val": [...],
    "test": [...], "student_train": [...]}``); the keys of ``require`` must be present
    (``student_train`` is, when ``train`` is). MTKDError naming the file when it is missing,
    a folder, binary, not JSON (e.g. truncated), or not of that form."""
    path = Path(path)
    data = _read_json(path)
    split = Split.from_dict(data, source=path)
    for key in require:
        if key not in data and not (key == "student_train" and "train" in data):
            raise MTKDError(f"split has no '{key}' list", path=path)
    return split


def _read_json(path: Path) -> Any:
    if path.is_dir():
        raise MTKDError("is a folder, not a split file (JSON)", path=path)
    if not path.is_file():
        raise MTKDError("split file not found", path=path)
    try:
        if path.stat().st_size > MAX_SPLIT_BYTES:
            raise MTKDError(
                f"too large for a split file (over {MAX_SPLIT_BYTES // 2**20} MiB)", path=path
            )
        text = path.read_bytes().decode("utf-8-sig")
        return json.loads(text)
    except OSError as error:
        raise MTKDError(f"cannot read ({error.strerror or error})", path=path) from None
    except UnicodeDecodeError:
        raise MTKDError("not a split file: binary content, not UTF-8 text", path=path) from None
    except json.JSONDecodeError as error:
        raise MTKDError(
            f"not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
            "a truncated or edited file?",
            path=path,
        ) from None
    except RecursionError:
        raise MTKDError("not a split file: nested too deeply", path=path) from None


def _rank(seed: int, salt: str, patient: str) -> bytes:
    return hashlib.sha256(f"{seed}\x00{salt}\x00{patient}".encode()).digest()


def _count(fraction: float, total: int) -> int:
    """``round(fraction * total)`` (halves up), at least 1 when ``fraction > 0``."""
    if fraction <= 0:
        return 0
    return max(1, math.floor(fraction * total + 0.5))


def _check_fraction(name: str, value: float, low_open: bool) -> None:
    ok = (0 < value <= 1) if low_open else (0 <= value < 1)
    if not isinstance(value, (int, float)) or not ok:
        interval = "(0, 1]" if low_open else "[0, 1)"
        raise MTKDError(f"{name} must be in {interval}, got {value!r}")


def _patients(cases: Iterable[Case]) -> dict[str, list[str]]:
    """patient id -> sorted case ids; duplicate case ids raise MTKDError."""
    groups: dict[str, list[str]] = {}
    seen: set[str] = set()
    for case in cases:
        if case.case_id in seen:
            raise MTKDError(f"duplicate case id '{case.case_id}'")
        seen.add(case.case_id)
        groups.setdefault(case.patient_id or case.case_id, []).append(case.case_id)
    return {patient: sorted(ids) for patient, ids in sorted(groups.items())}


def _cases_of(patients: Iterable[str], groups: Mapping[str, list[str]]) -> list[str]:
    return sorted(case_id for patient in patients for case_id in groups[patient])


def _student_subset(
    train: list[str], groups: Mapping[str, list[str]], fraction: float, seed: int
) -> list[str]:
    """``fraction`` of the training patients (at least one), chosen by a seeded hash."""
    case_patient = {case_id: p for p, ids in groups.items() for case_id in ids}
    train_patients = sorted({case_patient[c] for c in train})
    if not train_patients:
        return []
    ordered = sorted(train_patients, key=lambda p: _rank(seed, "student", p))
    return _cases_of(ordered[: _count(fraction, len(train_patients))], groups)


def _fixed_split(
    fixed: Mapping[str, Any], groups: Mapping[str, list[str]], fraction: float, seed: int
) -> Split:
    unknown_keys = sorted(set(fixed) - {*_PARTS, "student_train"})
    if unknown_keys:
        raise MTKDError(f"fixed split has unknown key(s) {', '.join(unknown_keys)}")
    known = {case_id for ids in groups.values() for case_id in ids}
    case_patient = {case_id: p for p, ids in groups.items() for case_id in ids}
    owner: dict[str, str] = {}
    lists: dict[str, list[str]] = {}
    for part in _PARTS:
        ids = fixed.get(part, []) or []
        if not isinstance(ids, (list, tuple)) or not all(isinstance(i, str) for i in ids):
            raise MTKDError(f"fixed split '{part}' must be a list of case ids")
        unknown = sorted(set(ids) - known)
        if unknown:
            raise MTKDError(f"fixed split '{part}' names unknown case(s): {', '.join(unknown)}")
        for case_id in ids:
            if case_id in owner:
                where = owner[case_id]
                twice = "twice in" if where == part else f"in both '{where}' and"
                raise MTKDError(f"case '{case_id}' is listed {twice} '{part}'")
            owner[case_id] = part
        lists[part] = sorted(ids)
    patient_part: dict[str, str] = {}
    for case_id, part in owner.items():
        patient = case_patient[case_id]
        if patient_part.setdefault(patient, part) != part:
            raise MTKDError(
                f"patient '{patient}' has cases in both '{patient_part[patient]}' and '{part}'"
            )
    if not lists["train"]:
        raise MTKDError("fixed split has no training cases")
    student = fixed.get("student_train")
    if student is None:
        student = _student_subset(lists["train"], groups, fraction, seed)
    else:
        outside = sorted(set(student) - set(lists["train"]))
        if outside:
            raise MTKDError(f"fixed student_train holds cases not in train: {', '.join(outside)}")
    return Split(lists["train"], lists["val"], lists["test"], sorted(student))


def split_cases(
    cases: list[Case],
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    student_fraction: float = 1.0,
    fixed: Mapping[str, Any] | None = None,
) -> Split:
    """Split cases by patient into train/val/test and pick the student's training subset.

    Fractions count patients (not cases) of the whole dataset: ``round(f * n)``, at least one
    patient for a non-zero fraction; test is taken first, val from the remaining patients, the
    rest (at least one patient) is train. ``student_train`` holds ``student_fraction`` of the
    training patients (at least one). ``fixed`` gives explicit ``train``/``val``/``test`` (and
    optionally ``student_train``) case lists instead; cases not listed are left out.
    """
    _check_fraction("val_fraction", val_fraction, low_open=False)
    _check_fraction("test_fraction", test_fraction, low_open=False)
    _check_fraction("student_fraction", student_fraction, low_open=True)
    groups = _patients(cases)
    if not groups:
        raise MTKDError("no cases to split")
    if fixed is not None:
        return _fixed_split(fixed, groups, student_fraction, seed)

    total = len(groups)
    n_test = _count(test_fraction, total)
    n_val = _count(val_fraction, total)
    if total - n_test - n_val < 1:
        raise MTKDError(
            f"{total} patient(s) ({sum(map(len, groups.values()))} cases) are too few for "
            f"val_fraction={val_fraction} and test_fraction={test_fraction}: that needs "
            f"{n_test} test + {n_val} val + at least 1 training patient"
        )
    ordered = sorted(groups, key=lambda p: _rank(seed, "split", p))
    test = _cases_of(ordered[:n_test], groups)
    val = _cases_of(ordered[n_test : n_test + n_val], groups)
    train = _cases_of(ordered[n_test + n_val :], groups)
    return Split(train, val, test, _student_subset(train, groups, student_fraction, seed))
