"""The annotate-then-distill loop: versions of a student, each fine-tuned from the previous one
on a training set that grows with the clinician's corrections (no Qt).

1. Segment a new case with the current student (MTKDSegment).
2. Correct it in the Segment Editor.
3. :meth:`DistillLoop.add_case` stores the corrected case in the training set, recording who
   added it and when.
4. :meth:`DistillLoop.next_options` configures "distill again": the same teacher, the enlarged
   training set, the student initialised from the current version (``model.init_from``).
5. :meth:`DistillLoop.record` imports the finished run into the model library as the next
   version, with its lineage (previous version, cases added, validation Dice of the previous
   version and of the new one on the new run's validation cases); :meth:`switch` and
   :meth:`rollback` choose which version is current.

The loop's state is ``DATASET/mtkd_loop.json``, written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mtkd.data.atomic import atomic_write_bytes
from mtkd.library import ModelLibrary
from mtkd.run_folder import RunDir
from MTKDLib.train_config import TrainingOptions
from MTKDLib.training_set import SceneCase, TrainingSet

LOOP_FILE = "mtkd_loop.json"


@dataclass
class Version:
    """One student version: its library key and where it came from."""

    key: str
    name: str
    number: int
    previous: str | None  # library key of the version it was fine-tuned from
    run: str | None  # the run that made it (None for the starting model)
    cases: list[str] = field(default_factory=list)  # training cases when it was made
    cases_added: list[str] = field(default_factory=list)  # new since the previous version
    val_dice_before: float | None = None  # previous version on this run's validation cases
    val_dice_after: float | None = None  # this version, same cases (best validation Dice)
    created: str = ""


class DistillLoop:
    """The loop over one training set (a dataset folder) with one model library."""

    def __init__(self, dataset: str | Path, library: ModelLibrary):
        self.training_set = TrainingSet(dataset)
        self.library = library
        self.path = Path(dataset) / LOOP_FILE

    # --- state ------------------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {"teacher": None, "versions": [], "current": None}
        try:
            return json.loads(self.path.read_text())
        except ValueError as error:
            raise ValueError(f"{self.path}: unreadable loop state ({error})") from None

    def _save(self, state: dict[str, Any]) -> None:
        atomic_write_bytes(self.path, (json.dumps(state, indent=2) + "\n").encode())

    def versions(self) -> list[Version]:
        return [Version(**item) for item in self._load()["versions"]]

    def current(self) -> Version | None:
        state = self._load()
        return next((v for v in self.versions() if v.key == state["current"]), None)

    @property
    def teacher(self) -> str | None:
        return self._load()["teacher"]

    def begin(self, student_key: str, teacher: str | Path) -> Version:
        """Start the loop with a library model (version 1) and the teacher that guides it."""
        if self._load()["versions"]:
            raise ValueError(f"{self.path}: this training set already has a loop")
        entry = self.library.get(student_key)
        version = Version(entry.key, entry.name, 1, None, None, self.training_set.case_ids(),
                          created=_now())  # fmt: skip
        self._save({"teacher": str(teacher), "versions": [asdict(version)],
                    "current": version.key})  # fmt: skip
        return version

    # --- the steps --------------------------------------------------------------------------

    def add_case(self, case: SceneCase, added_by: str | None = None, note: str = "") -> str:
        """Step 3: store a corrected case in the training set; its case id."""
        current = self.current()
        note = note or (f"corrected segmentation of {current.name}" if current else "")
        return self.training_set.add(case, added_by=added_by, note=note)

    def next_options(self, options: TrainingOptions) -> TrainingOptions:
        """Step 4: ``options`` for the next version: this training set, the loop's teacher,
        initialised from the current version, named "<base> v<n+1>"."""
        current = self.current()
        if current is None:
            raise ValueError("start the loop with a student first")
        base = current.name.rsplit(" v", 1)[0]
        return dataclasses.replace(
            options,
            dataset=str(self.training_set.folder),
            teacher=self.teacher or options.teacher,
            init_from=str(self.library.path_of(current.key)),
            name=f"{base} v{len(self.versions()) + 1}",
        )

    def record(self, run_dir: str | Path) -> Version:
        """Step 5: the finished run ``run_dir`` becomes the next version (in the library, with
        its lineage) and the current one."""
        run_dir = Path(run_dir)
        metadata_file = RunDir(run_dir).model_metadata
        if not metadata_file.is_file():
            raise ValueError(f"{run_dir}: the run has not finished (no model/ yet)")
        metadata = json.loads(metadata_file.read_text())
        metrics = metadata.get("metrics", {})
        previous = self.current()
        cases = self.training_set.case_ids()
        added = [case for case in cases if previous is None or case not in previous.cases]
        number = len(self.versions()) + 1
        history = {
            "loop": str(self.training_set.folder),
            "version": number,
            "previous": None if previous is None else previous.key,
            "cases_added": added,
            "val_dice_before": metrics.get("initial_val_dice"),
            "val_dice_after": metrics.get("best_val_dice"),
        }
        entry = self.library.import_model(run_dir, name=metadata.get("name"), history=history)
        version = Version(entry.key, entry.name, number, history["previous"], str(run_dir),
                          cases, added, history["val_dice_before"], history["val_dice_after"],
                          _now())  # fmt: skip
        state = self._load()
        state["versions"].append(asdict(version))
        state["current"] = version.key
        self._save(state)
        return version

    def switch(self, key: str) -> Version:
        """Make version ``key`` the current one."""
        state = self._load()
        version = next((v for v in self.versions() if v.key == key), None)
        if version is None:
            raise ValueError(f"no version '{key}' in this loop")
        state["current"] = key
        self._save(state)
        return version

    def rollback(self) -> Version:
        """Make the version the current one was fine-tuned from current again."""
        current = self.current()
        if current is None or current.previous is None:
            raise ValueError("there is no earlier version to roll back to")
        return self.switch(current.previous)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
