"""The annotate-then-distill loop's split, pinned when the loop begins, and the check of a run
the loop started before it becomes a version (no Qt, no torch).

The validation and test cases are chosen once, by patient (all cases of a patient land in one
part), and kept in the loop's file; every case added later goes to training, or to the test
set when the user says so. Each run gets the split as explicit case lists (the engine's
``split.fixed``), so it trains on every training case it was given and nothing moves between
runs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtkd.run_folder import FINISHED, RunDir

VAL_FRACTION = TEST_FRACTION = 0.2  # of the patients, at least one each


@dataclass
class LoopSplit:
    """The loop's cases by part now, and the patients of each part."""

    train: list[str]
    val: list[str]
    test: list[str]
    patients: dict[str, str]  # case id -> patient id

    @classmethod
    def of(cls, pinned: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> LoopSplit:
        """The split of the cases ``records`` lists (``mtkd_cases.json``): ``pinned``'s
        validation and test cases, the cases added with ``part: test``, the rest training."""
        val = list(pinned["val"])
        test = list(pinned["test"])
        test += [r["case"] for r in records if r.get("part") == "test" and r["case"] not in test]
        held = set(val) | set(test)
        train = [r["case"] for r in records if r["case"] not in held]
        patients = {r["case"]: str(r.get("patient") or r["case"]) for r in records}
        return cls(train, val, test, patients)

    def patients_of(self, cases: Sequence[str]) -> set[str]:
        return {self.patients.get(case, case) for case in cases}

    def fixed(self) -> dict[str, list[str]]:
        """The split a run gets (``split.fixed``): the student trains on every training case."""
        return {"train": list(self.train), "val": list(self.val), "test": list(self.test),
                "student_train": list(self.train)}  # fmt: skip

    def check_new_case(self, patient: str | None, to_test: bool) -> None:
        """ValueError when a new case of ``patient`` would put one patient in two parts:
        validation stays as pinned; a test patient's case goes to test only; a training
        patient's case cannot go to test."""
        if not patient:
            return  # its own patient (the new case id)
        if patient in self.patients_of(self.val):
            raise ValueError(
                f"patient '{patient}' is in the loop's validation cases, which stay as they "
                "were pinned: a new case of this patient can be neither trained on nor scored"
            )
        if patient in self.patients_of(self.test) and not to_test:
            raise ValueError(
                f"patient '{patient}' is in the loop's test cases: add this case to the test "
                "set, or training would see a patient the versions are scored on"
            )
        if to_test and patient in self.patients_of(self.train):
            raise ValueError(
                f"patient '{patient}' has training cases: a case of this patient in the test "
                "set would score the versions on a patient they trained on"
            )

    @staticmethod
    def test_groups(test: Sequence[str], earlier: Sequence[str]) -> dict[str, list[str]]:
        """The groups versions are scored on: all test cases, those the previous version was
        scored on too ("test_old") and the ones added since ("test_new")."""
        before = set(earlier)
        return {"test": list(test), "test_old": [c for c in test if c in before],
                "test_new": [c for c in test if c not in before]}  # fmt: skip


def pin_split(
    patients: Mapping[str, str],
    val: Sequence[str] | None = None,
    test: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The loop's pinned split ``{"val": [...], "test": [...], "seed": seed}`` of the cases
    ``patients`` (case id -> patient id): ``val`` and ``test`` as given (checked), else a fifth
    of the patients each, at least one, chosen by ``seed`` as the engine splits. ValueError
    naming the problem: an unknown case, a case in both, a patient split across parts, no
    training or no test case."""
    if val is None and test is None:
        val, test = _chosen(patients, seed)
    val, test = list(val or []), list(test or [])
    unknown = sorted(set(val + test) - set(patients))
    if unknown:
        raise ValueError(f"the training set has no case(s) {', '.join(unknown)}")
    both = sorted(set(val) & set(test))
    if both:
        raise ValueError(f"case(s) {', '.join(both)} cannot be in both validation and test")
    part = {case: "val" for case in val} | {case: "test" for case in test}
    for case, patient in patients.items():
        mates = {part.get(c, "train") for c, p in patients.items() if p == patient}
        if len(mates) > 1:
            raise ValueError(
                f"patient '{patient}' (case '{case}') has cases in {' and '.join(sorted(mates))}"
                ": all cases of a patient belong to one part"
            )
    if len(part) == len(patients):
        raise ValueError("the loop needs at least one training case besides validation and test")
    if not test:
        raise ValueError("the loop needs at least one test case to compare its versions on")
    return {"val": sorted(val), "test": sorted(test), "seed": seed}


def _chosen(patients: Mapping[str, str], seed: int) -> tuple[list[str], list[str]]:
    """Validation and test cases chosen by the engine's patient-level split."""
    from mtkd.data.datasets import Case
    from mtkd.data.splits import split_cases
    from mtkd.errors import MTKDError

    cases = [Case(case, Path(f"{case}.nii.gz"), None, p) for case, p in patients.items()]
    try:
        split = split_cases(cases, VAL_FRACTION, TEST_FRACTION, seed)
    except MTKDError as error:
        raise ValueError(f"cannot pin the loop's validation and test cases: {error}") from None
    return split.val, split.test


def check_run(run_dir: Path, dataset: Path, started: Mapping[str, Any] | None) -> list[str]:
    """The cases the run in ``run_dir`` trained on, after checking that it is the finished run
    the loop started (``started``: the loop's record of it; None when it has none): on this
    dataset, with the split and parent weights the loop gave it. ValueError naming the folder
    and what differs otherwise."""
    from mtkd.data.splits import read_split
    from mtkd.errors import MTKDError

    run = RunDir(run_dir)
    try:
        config = run.load_config()
    except MTKDError as error:
        raise ValueError(f"{run_dir}: not a run folder ({error})") from None
    source = Path(config.data.source)
    if source.resolve() != Path(dataset).resolve():
        raise ValueError(
            f"{run_dir}: this run trained on {source}, not on this loop's training set "
            f"{dataset}; it cannot become a version of this loop"
        )
    if started is None:
        raise ValueError(
            f"{run_dir}: this loop did not start this run (only a run begun with Distill again "
            "becomes a version); use Add to library for other runs"
        )
    if run.state != FINISHED:
        raise ValueError(f"{run_dir}: the run has not finished (no model/ yet)")
    try:
        split = read_split(run.split, require=("train", "val", "test"))
    except MTKDError as error:
        raise ValueError(str(error)) from None
    given = started["split"]
    for part in ("train", "val", "test", "student_train"):
        if sorted(getattr(split, part)) != sorted(given[part]):
            raise ValueError(
                f"{run.split}: the run's '{part}' cases are not the ones the loop gave it; it "
                "cannot become a version"
            )
    _check_parent(run, started)
    return sorted(split.student_train)


def _check_parent(run: RunDir, started: Mapping[str, Any]) -> None:
    """The run started from the weights the loop pinned for its parent version."""
    metadata = json.loads(run.model_metadata.read_text(encoding="utf-8"))
    previous = (metadata.get("lineage") or {}).get("previous") or {}
    expected = started.get("parent_sha256")
    if expected and previous.get("weights_sha256") != expected:
        raise ValueError(
            f"{run.model_metadata}: the run did not start from the weights of the version the "
            f"loop gave it (SHA-256 {str(previous.get('weights_sha256'))[:12]}..., expected "
            f"{expected[:12]}...); it cannot become a version"
        )
