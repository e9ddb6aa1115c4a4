"""The annotate-then-distill loop: versions of a student, each fine-tuned from the previous one
on a training set that grows with the clinician's corrections (no Qt).

1. :meth:`DistillLoop.begin` takes a library model as version 1 and pins the split: the
   validation and test cases are fixed, by patient, in the loop's file and never move.
2. Segment a new case with the current student (MTKDSegment) and correct it.
3. :meth:`DistillLoop.add_case` stores it in the training set (who, when, its patient); it goes
   to training, or to the test set when asked.
4. :meth:`DistillLoop.next_run` prepares "distill again": a new run folder of its own, the same
   teacher, the current version's weights to start from with the loop's fine-tuning recipe
   (:mod:`MTKDLib.loop_recipe`: lower learning rate, shorter schedule, the anchor to the
   parent when on), and the split given explicitly (every training case trained on); the
   loop records the run it started.
5. :meth:`DistillLoop.record` accepts only a run it started, unchanged: the run's dataset,
   split and parent weights are checked against that record. The new and the previous version
   are scored on the same test cases (:mod:`MTKDLib.loop_scores`); a version worse by the
   margin becomes a version but not the current one unless the user says so.
   :meth:`switch` and :meth:`rollback` choose the current version.

Versions are pinned by the SHA-256 of their weights: a library model deleted and imported
again under the same key is refused. Every write holds the dataset folder's lock
(:func:`MTKDLib.training_set.dataset_lock`). The loop's state is ``DATASET/mtkd_loop.json``,
written atomically; which test cases a case added later belongs to is written with the case
itself (``part`` in ``mtkd_cases.json``), so no fact is in two files.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mtkd.data.atomic import atomic_write_bytes
from mtkd.folder_lock import holder_of
from mtkd.library import ModelLibrary
from mtkd.run_folder import RunDir
from MTKDLib.loop_recipe import FINE_TUNE, FineTuneRecipe
from MTKDLib.loop_scores import DEFAULT_MARGIN, Scorer, Scores, gate_reasons, score_versions
from MTKDLib.loop_split import LoopSplit, check_run, pin_split
from MTKDLib.train_config import TrainingOptions
from MTKDLib.training_set import SceneCase, TrainingSet, dataset_lock

LOOP_FILE = "mtkd_loop.json"
LOOP_SETTING = "MTKD/loopTrainingSet"  # the application setting naming the loop in use


@dataclass
class Version:
    """One student version: its library key, its weights' SHA-256 and where it came from."""

    key: str
    name: str
    number: int
    previous: str | None  # library key of the version it was fine-tuned from
    run: str | None  # the run that made it (None for the starting model)
    cases: list[str] = field(default_factory=list)  # the cases it trained on (loop runs)
    cases_added: list[str] = field(default_factory=list)  # new since the previous version
    val_dice_before: float | None = None  # previous version on this run's validation cases
    val_dice_after: float | None = None  # this version, same cases (best validation Dice)
    created: str = ""
    sha256: str = ""  # of its weights when it became a version
    test_cases: list[str] = field(default_factory=list)  # the test set it was scored on
    scores: dict[str, Any] = field(default_factory=dict)  # MTKDLib.loop_scores
    gate: dict[str, Any] = field(default_factory=dict)  # margin, reasons, accepted


@dataclass
class Recorded:
    """What :meth:`DistillLoop.record` did: the version, whether it is current, and why not."""

    version: Version
    current: bool
    reasons: list[str]  # why it is worse than the previous version (empty: it is not)


class WorseVersion(ValueError):
    """A version the gate stopped: becoming current needs the user's explicit choice."""

    def __init__(self, version: Version, reasons: list[str]):
        self.version, self.reasons = version, reasons
        super().__init__(
            f"v{version.number} ({version.name}) is worse than the version it was fine-tuned "
            "from on the loop's test cases: " + "; ".join(reasons)
        )


class DistillLoop:
    """The loop over one training set (a dataset folder) with one model library.

    ``scorer`` scores models on test cases (default :func:`MTKDLib.loop_scores.
    score_versions`); ``margin``: the Dice a new version may lose (see :meth:`record`);
    ``recipe``: how its runs fine-tune (:data:`MTKDLib.loop_recipe.FINE_TUNE`)."""

    def __init__(
        self,
        dataset: str | Path,
        library: ModelLibrary,
        scorer: Scorer | None = None,
        margin: float = DEFAULT_MARGIN,
        recipe: FineTuneRecipe = FINE_TUNE,
    ):
        self.training_set = TrainingSet(dataset)
        self.library = library
        self.path = Path(dataset) / LOOP_FILE
        self.scorer = scorer or score_versions
        self.margin = margin
        self.recipe = recipe

    # --- state ------------------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {"teacher": None, "versions": [], "current": None, "split": None, "runs": []}
        try:
            state = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"{self.path}: unreadable loop state ({error})") from None
        state.setdefault("split", None)
        state.setdefault("runs", [])
        return state

    def _save(self, state: dict[str, Any]) -> None:
        atomic_write_bytes(self.path, (json.dumps(state, indent=2) + "\n").encode("utf-8"))

    def versions(self) -> list[Version]:
        return [Version(**item) for item in self._load()["versions"]]

    def version(self, key: str) -> Version:
        found = next((v for v in self.versions() if v.key == key), None)
        if found is None:
            raise ValueError(f"no version '{key}' in this loop ({self.path})")
        return found

    def current(self) -> Version | None:
        state = self._load()
        return next((v for v in self.versions() if v.key == state["current"]), None)

    @property
    def teacher(self) -> str | None:
        return self._load()["teacher"]

    def split(self) -> LoopSplit:
        """The loop's split now: the pinned validation and test cases, the cases added to the
        test set since, and every other case for training."""
        pinned = self._load()["split"]
        if pinned is None:
            raise ValueError(f"{self.path}: this loop has no pinned split; begin it again")
        return LoopSplit.of(pinned, self.training_set.records())

    def begin(
        self,
        student_key: str,
        teacher: str | Path,
        val: list[str] | None = None,
        test: list[str] | None = None,
        seed: int = 0,
    ) -> Version:
        """Start the loop with a library model (version 1) and the teacher that guides it, and
        pin the split: ``val`` and ``test`` case ids as given, else a fifth of the patients
        each (at least one), chosen by ``seed``."""
        with dataset_lock(self.training_set.folder, "MTKD Train (beginning the loop)"):
            self.training_set.repair()
            if self._load()["versions"]:
                raise ValueError(f"{self.path}: this training set already has a loop")
            entry = self.library.get(student_key)
            pinned = pin_split(self.training_set.patients(), val, test, seed)
            train = LoopSplit.of(pinned, self.training_set.records()).train
            version = Version(entry.key, entry.name, 1, None, None, train, sha256=entry.sha256,
                              test_cases=list(pinned["test"]), created=_now())  # fmt: skip
            self._save({"teacher": str(teacher), "split": pinned, "versions": [asdict(version)],
                        "current": version.key, "runs": []})  # fmt: skip
        return version

    # --- the steps --------------------------------------------------------------------------

    def add_case(
        self,
        case: SceneCase,
        added_by: str | None = None,
        note: str = "",
        patient: str | None = None,
        to_test: bool = False,
    ) -> str:
        """Step 3: store a corrected case; its case id. It goes to training, or to the test set
        with ``to_test``. A case of a patient whose cases are pinned for validation or test
        (or, with ``to_test``, train) is refused before anything is written: it would carry
        what a model trained on into the cases it is scored on."""
        with dataset_lock(self.training_set.folder, "MTKD Train (adding a case)"):
            self.training_set.repair()
            self.split().check_new_case(patient, to_test)
            current = self.current()
            note = note or (f"corrected segmentation of {current.name}" if current else "")
            part = "test" if to_test else None
            return self.training_set.add(case, added_by, note, patient=patient, part=part)

    def next_run(self, options: TrainingOptions, runs_folder: str | Path) -> tuple:
        """Step 4: ``(options, run folder)`` for the next version: a new folder of its own
        under ``runs_folder`` (never one another press or process took), this training set,
        the loop's teacher, the current version's weights (SHA-256 checked) to start from
        with :attr:`recipe` (learning rate, epochs, early stopping, anchor), named
        "<base> v<n+1>", and the loop's split given explicitly (the student trains on every
        training case). The loop records the run as the one it started."""
        with dataset_lock(self.training_set.folder, "MTKD Train (starting a loop run)"):
            self.training_set.repair()
            current = self.current()
            if current is None:
                raise ValueError("start the loop with a student first")
            parent = self._checked(current)
            split = self.split()
            base = current.name.rsplit(" v", 1)[0]
            name = f"{base} v{len(self.versions()) + 1}"
            run_dir = _new_folder(Path(runs_folder), name)
            options = dataclasses.replace(
                self.recipe.apply(options, parent, validation=bool(split.val)),
                dataset=str(self.training_set.folder),
                teacher=self.teacher or options.teacher,
                name=name,
                student_fraction=1.0,
                split=split.fixed(),
            )
            state = self._load()
            state["runs"].append({"run": str(run_dir), "parent": current.key,
                                  "parent_sha256": current.sha256, "split": split.fixed(),
                                  "device": options.device, "started": _now(),
                                  "recipe": dataclasses.asdict(self.recipe)})  # fmt: skip
            self._save(state)
        return options, run_dir

    def started_runs(self) -> list[str]:
        """The run folders the loop started that have not become versions yet."""
        return [started["run"] for started in self._load()["runs"]]

    def scoring_plan(self, run_dir: str | Path) -> dict[str, Any]:
        """What scoring the finished run ``run_dir`` needs, after checking it is the run the
        loop started (see :meth:`record`): the dataset, the models ("new": the run, "previous":
        its parent version, SHA-256 checked), the groups of test cases and the device."""
        run_dir = Path(run_dir).absolute()
        started = next((r for r in self._load()["runs"] if r["run"] == str(run_dir)), None)
        trained = check_run(run_dir, self.training_set.folder, started)
        parent = self.version(started["parent"])
        return {
            "dataset": str(self.training_set.folder),
            "models": {"new": str(run_dir), "previous": str(self._checked(parent))},
            "groups": LoopSplit.test_groups(started["split"]["test"], parent.test_cases),
            "device": started.get("device", "auto"),
            "parent": parent.key,
            "trained": trained,
        }

    def record(
        self, run_dir: str | Path, accept_worse: bool = False, scores: Scores | None = None
    ) -> Recorded:
        """Step 5: the finished run ``run_dir``, started by :meth:`next_run`, becomes the next
        version (in the library, with its lineage and scores). It becomes the current one
        unless it is worse than its parent on the test cases (by :attr:`margin` on a structure
        or on the mean) and ``accept_worse`` is not given: then :attr:`Recorded.reasons` says
        why. ValueError naming the folder for a run of another dataset, one the loop did not
        start, or one whose split or parent weights differ from what the loop gave it.
        ``scores``: the versions' scores on :meth:`scoring_plan`'s cases when already made (the
        panel scores out of Slicer's process); else :attr:`scorer` makes them. Recording the
        same run again returns the version it became."""
        run_dir = Path(run_dir).absolute()
        done = next((v for v in self.versions() if v.run == str(run_dir)), None)
        if done is not None:
            return Recorded(done, self._load()["current"] == done.key, done.gate.get("reasons", []))
        plan = self.scoring_plan(run_dir)
        parent = self.version(plan["parent"])
        if scores is None:
            scores = self.scorer(plan["dataset"], plan["models"], plan["groups"], plan["device"])
        reasons = gate_reasons(scores.get("new", {}).get("test", {}),
                               scores.get("previous", {}).get("test", {}), self.margin,
                               f"v{parent.number}")  # fmt: skip
        with dataset_lock(self.training_set.folder, "MTKD Train (recording a version)"):
            return self._store_version(run_dir, parent, plan["trained"], scores, reasons,
                                       accept_worse)  # fmt: skip

    def _store_version(self, run_dir, parent, trained, scores, reasons, accept_worse) -> Recorded:
        """Import the run into the library (once: an entry a crash left is reused) and write
        the version into the loop's file; under the lock."""
        state = self._load()
        done = next((v for v in state["versions"] if v["run"] == str(run_dir)), None)
        if done is not None:  # another follower recorded it meanwhile
            return Recorded(Version(**done), state["current"] == done["key"], reasons)
        started = next(r for r in state["runs"] if r["run"] == str(run_dir))
        metadata = json.loads(RunDir(run_dir).model_metadata.read_text(encoding="utf-8"))
        metrics = metadata.get("metrics", {})
        number = len(state["versions"]) + 1
        added = [case for case in trained if case not in parent.cases]
        history = {"loop": str(self.training_set.folder.absolute()), "version": number,
                   "previous": parent.key, "run": str(run_dir), "cases_added": added,
                   "val_dice_before": metrics.get("initial_val_dice"),
                   "val_dice_after": metrics.get("best_val_dice")}  # fmt: skip
        entry = self._entry_of_run(run_dir) or self.library.import_model(
            run_dir, name=metadata.get("name"), history=history
        )
        make_current = not reasons or accept_worse
        accepted = bool(reasons) and accept_worse
        gate = {"margin": self.margin, "reasons": reasons, "accepted": accepted}
        version = Version(entry.key, entry.name, number, parent.key, str(run_dir), trained, added,
                          history["val_dice_before"], history["val_dice_after"], _now(),
                          entry.sha256, list(started["split"]["test"]), scores, gate)  # fmt: skip
        state["versions"].append(asdict(version))
        state["runs"] = [r for r in state["runs"] if r["run"] != str(run_dir)]
        if make_current:
            state["current"] = version.key
        self._save(state)
        return Recorded(version, make_current, reasons)

    def _entry_of_run(self, run_dir: Path):
        """The library entry this loop made from ``run_dir`` before (a crash between the
        library's write and the loop's), or None."""
        folder = str(self.training_set.folder.absolute())
        for entry in self.library.entries():
            if entry.history.get("loop") == folder and entry.history.get("run") == str(run_dir):
                return entry
        return None

    # --- choosing the current version -------------------------------------------------------

    def _checked(self, version: Version) -> Path:
        """The library folder of ``version``, its weights checked against the pinned SHA-256:
        ValueError when the library no longer has it or has another model under its key."""
        try:
            entry = self.library.get(version.key)
        except Exception:  # noqa: BLE001 - MTKDError: no such entry
            raise ValueError(
                f"version v{version.number} ('{version.key}') is no longer in the model "
                f"library ({self.library.root}); import its model again or choose another version"
            ) from None
        if version.sha256 and entry.sha256 != version.sha256:
            raise ValueError(
                f"the model library's '{version.key}' is not version v{version.number} any "
                f"more: its weights' SHA-256 is {entry.sha256[:12]}..., the loop pinned "
                f"{version.sha256[:12]}... (deleted and imported again?); import that "
                "version's model again or choose another version"
            )
        return self.library.path_of(version.key)

    def running_run(self) -> str | None:
        """The folder of a run this loop started that a live process is writing, or None."""
        for started in self._load()["runs"]:
            holder = holder_of(started["run"])
            if holder is not None and (not holder.on_this_host or holder.alive()):
                return started["run"]
        return None

    def switch(self, key: str, accept_worse: bool = False) -> Version:
        """Make version ``key`` the current one (its SHA-256 checked). A version the gate
        stopped needs ``accept_worse`` (:class:`WorseVersion` says why otherwise). Refused
        while a run of the loop is going: that run was started from the current version."""
        with dataset_lock(self.training_set.folder, "MTKD Train (switching the version)"):
            running = self.running_run()
            if running:
                raise ValueError(f"a run of this loop is going ({running}): wait until it ends")
            version = self.version(key)
            self._checked(version)
            gate = version.gate
            if gate.get("reasons") and not gate.get("accepted") and not accept_worse:
                raise WorseVersion(version, gate["reasons"])
            state = self._load()
            if gate.get("reasons") and accept_worse:
                for item in state["versions"]:
                    if item["key"] == key:
                        item["gate"]["accepted"] = True
            state["current"] = key
            self._save(state)
        return version

    def rollback(self) -> Version:
        """Make the version the current one was fine-tuned from current again."""
        current = self.current()
        if current is None or current.previous is None:
            raise ValueError("there is no earlier version to roll back to")
        return self.switch(current.previous, accept_worse=True)  # it was current before


def loop_version_warning(library: ModelLibrary, key: str, loops: list[str | Path] = ()) -> str:
    """A warning when the library model ``key`` is a version of a loop (the one its history
    names, or one of ``loops``): deleting it breaks that loop's switch and roll back. Empty
    when it is not."""
    try:
        entry = library.get(key)
    except Exception:  # noqa: BLE001 - not in the library: nothing to warn about
        return ""
    folders = [*loops, *([entry.history["loop"]] if entry.history.get("loop") else [])]
    for folder in dict.fromkeys(str(f) for f in folders):
        if not (Path(folder) / LOOP_FILE).is_file():
            continue
        loop = DistillLoop(folder, library)
        found = next((v for v in loop.versions() if v.key == key), None)
        if found is not None:
            current = loop.current()
            role = " (its current version)" if current and current.key == key else ""
            return (
                f"'{entry.name}' is version v{found.number}{role} of the annotate-then-distill "
                f"loop of {folder}: without it that version cannot be switched or rolled back to"
            )
    return ""


def current_version_key(folder: str | Path | None) -> str | None:
    """The library key of the current version of the loop in ``folder`` (None: no loop)."""
    if not folder or not (Path(folder) / LOOP_FILE).is_file():
        return None
    try:
        return json.loads((Path(folder) / LOOP_FILE).read_text(encoding="utf-8")).get("current")
    except (OSError, ValueError):
        return None


def _new_folder(parent: Path, name: str) -> Path:
    """A folder under ``parent`` named after ``name`` that did not exist (created now)."""
    parent.mkdir(parents=True, exist_ok=True)
    base = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._") or "run"
    for number in range(1, 10000):
        folder = parent / (base if number == 1 else f"{base}-{number}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder.absolute()
    raise ValueError(f"{parent}: no free run folder name for '{name}'")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
