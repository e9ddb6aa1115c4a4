"""The data of a run: its cases, split, structures, preprocessing and training samples.

Images without labels (``distill.unlabelled``): the run's training samples are those of the
labelled training cases (``train_on``) and of the unlabelled ones, in one list; an epoch is one
pass over all of them in a random order, so each batch mixes labelled and unlabelled samples in
their proportion (on average). The segmentation loss covers the labelled samples of a batch,
the distillation terms all of them (:mod:`mtkd.engine.step`). ``train_on: none`` leaves no
labels: teacher targets only. Validation is on the labelled validation cases.

A run records what it trains on (``RUN/fingerprint.json``: its cases' files and its teacher,
:mod:`mtkd.engine.fingerprint`); a resume is refused, naming the difference, when they changed.
Under ``torchrun`` rank 0 makes these checks and every rank stops when one fails.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mtkd.config import UNLABELLED_NONE, UNLABELLED_TRAIN, RunConfig
from mtkd.data.datasets import Case, DatasetIndex, load_dataset, load_unlabelled
from mtkd.data.labels import LabelTable
from mtkd.data.loading import PatchDataset, SliceDataset, VolumeCache
from mtkd.data.preprocess import Preprocessing
from mtkd.data.splits import Split, split_cases
from mtkd.data.stored_outputs import StoredOutputs
from mtkd.distill.presets import feature_weights, resolve_output_term
from mtkd.engine.distributed import Distributed
from mtkd.engine.fingerprint import fingerprint_differences, read_fingerprint, run_fingerprint
from mtkd.engine.setup_teacher import open_teacher
from mtkd.engine.teacher_source import TeacherSource, is_stored_teacher
from mtkd.engine.teacher_targets import PRECOMPUTED, teacher_targets
from mtkd.errors import MTKDError
from mtkd.run_folder import EventLog, RunDir

__all__ = [
    "UNLABELLED_PATIENT",
    "RunData",
    "build_run_data",
    "labelled_training_cases",
    "output_activation",
    "raise_on_every_rank",
    "unlabelled_training_cases",
]

# the patient ids of the cases of a distill.unlabelled folder start with this (other subjects
# than the dataset's, whatever their names)
UNLABELLED_PATIENT = "unlabelled/"


@dataclass
class RunData:
    """What the training loop reads of a run's data."""

    labels: LabelTable  # the run's structures (data.structures), in output-channel order
    activation: str  # "softmax" or "sigmoid"
    prep: Preprocessing
    split: Split
    train_ids: list[str]  # the training cases whose labels the run uses (train_on)
    unlabelled_ids: list[str]  # training images used without labels (distill.unlabelled)
    cache: VolumeCache  # every case (and unlabelled image), prepared once
    train_set: SliceDataset | PatchDataset  # the samples of train_ids + unlabelled_ids
    # stored teacher outputs; a teacher network opens later (with precomputed teacher
    # targets, cache.teacher_logits, it then attaches its logits to the training cases)
    source: TeacherSource | None


def build_run_data(
    config: RunConfig,
    run_dir: RunDir,
    *,
    resume: bool,
    dist: Distributed,
    device: torch.device,
    log: Callable[[str], None],
    events: EventLog,
) -> RunData:
    """Load the dataset and the unlabelled images, check (rank 0) and record the fingerprint,
    split the cases (a resumed run keeps its split) and prepare the training samples.

    Stored teacher outputs are opened here, to be cached with the cases; a teacher network is
    opened after the student is built (:mod:`mtkd.engine.setup_models`), so the student's
    random initialisation is the same as without a teacher."""
    data = config.data
    dataset = load_dataset(data.source, labels_json=data.labels_json)
    extra_cases = _unlabelled_folder(config, dataset)
    fingerprint = _on_rank_0(
        dist,
        device,
        run_dir,
        "rank 0 refused the run's data or teacher",
        lambda: _check_fingerprint(config, dataset, extra_cases, run_dir, resume, log, events),
    )
    if data.structures:
        labels, mapping = dataset.labels.select(data.structures)
    else:
        labels = dataset.labels
        mapping = {value: value for value in dataset.labels.label_values}
    activation = output_activation(data.output, len(labels))
    prep = Preprocessing.from_config(data)
    split = _split(config, dataset, run_dir, resume=resume, is_main=dist.is_main)
    train_ids, unlabelled_ids = _training_ids(config, split, extra_cases, log)
    _on_rank_0(
        dist,
        device,
        run_dir,
        "rank 0 refused the unlabelled images",
        lambda: _check_no_leak(fingerprint, split, extra_cases),
    )
    sample_ids = train_ids + unlabelled_ids
    source, stored = _stored_teacher(config, labels, activation, prep, device, log, sample_ids)
    precomputed = _precomputed_teacher(config)
    cache = VolumeCache(
        dataset.cases + extra_cases,
        dataset.labels,
        mapping,
        prep,
        teacher=stored,
        teacher_cases=sample_ids,
        unlabelled=unlabelled_ids,
        teacher_logits=precomputed,
    )
    if data.dims == 2:
        train_set = SliceDataset(cache, sample_ids, data.augment)
    else:
        train_set = PatchDataset(
            cache,
            sample_ids,
            prep.patch_size,
            len(labels) + 1,
            data.patches_per_volume,
            data.augment,
        )
    return RunData(
        labels=labels,
        activation=activation,
        prep=prep,
        split=split,
        train_ids=train_ids,
        unlabelled_ids=unlabelled_ids,
        cache=cache,
        train_set=train_set,
        source=source,
    )


def labelled_training_cases(split: Split, train_on: str) -> list[str]:
    """The training cases whose labels a run uses: ``train_on`` train (all), student_train
    (the students' share) or none."""
    if train_on == "none":
        return []
    return list(split.train if train_on == "train" else split.student_train)


def unlabelled_training_cases(split: Split, train_on: str) -> list[str]:
    """``distill.unlabelled: train``: the training cases whose labels ``train_on`` leaves out,
    in the split's order."""
    labelled = set(labelled_training_cases(split, train_on))
    return [case_id for case_id in split.train if case_id not in labelled]


def output_activation(setting: str, num_structures: int) -> str:
    if setting == "sigmoid" and num_structures != 1:
        raise MTKDError("data.output 'sigmoid' needs exactly one structure; use softmax")
    if setting == "auto":
        return "sigmoid" if num_structures == 1 else "softmax"
    return setting


def raise_on_every_rank(
    dist: Distributed, device: torch.device, error: MTKDError | None, others: str, where: Path
) -> None:
    """Raise ``error`` on rank 0 and an error saying ``others`` (at ``where``) on the other
    ranks when rank 0 had one (``error`` is only known there); nothing when it had none."""
    if dist.any(error is not None, device):
        raise error or MTKDError(f"{others}; see rank 0's message", where)


def _on_rank_0(
    dist: Distributed, device: torch.device, run_dir: RunDir, others: str, check: Callable[[], Any]
) -> Any:
    """``check()`` on rank 0 (its result there, None elsewhere); its MTKDError stops every
    rank (see :func:`raise_on_every_rank`)."""
    result, error = None, None
    if dist.is_main:
        try:
            result = check()
        except MTKDError as problem:
            error = problem
    raise_on_every_rank(dist, device, error, others, run_dir.root)
    return result


def _split(
    config: RunConfig, dataset: DatasetIndex, run_dir: RunDir, *, resume: bool, is_main: bool
) -> Split:
    """The run's split: a resumed run's recorded one, else a new one that rank 0 records."""
    if resume and run_dir.split.is_file():
        return Split.from_dict(json.loads(run_dir.split.read_text()))
    settings = config.split
    split = split_cases(
        dataset.cases,
        val_fraction=settings.val_fraction,
        test_fraction=settings.test_fraction,
        seed=settings.seed,
        student_fraction=settings.student_fraction,
        fixed=settings.fixed,
    )
    if is_main:
        run_dir.write_json(run_dir.split, split.to_dict())
    return split


def _training_ids(
    config: RunConfig, split: Split, extra_cases: list[Case], log: Callable[[str], None]
) -> tuple[list[str], list[str]]:
    """The labelled and the unlabelled training cases; the unlabelled ones are left out (or
    the run refused, when it has no labels either) when no distillation term weighs."""
    train_ids = labelled_training_cases(split, config.train_on)
    if config.unlabelled_images() == UNLABELLED_TRAIN:
        unlabelled_ids = unlabelled_training_cases(split, config.train_on)
    else:
        unlabelled_ids = [case.case_id for case in extra_cases]
    if unlabelled_ids and not _distills(config):
        if not train_ids:
            raise MTKDError(
                "train_on: none (no labels) needs distillation terms with a weight above "
                "0; every weight is 0 here",
                config.origin.file if config.origin else None,
            )
        log(
            f"[{config.name}] every distillation weight is 0 (the no-KD baseline): "
            "the unlabelled images (distill.unlabelled), which only distillation uses, are "
            "left out"
        )
        unlabelled_ids = []
    return train_ids, unlabelled_ids


def _distills(config: RunConfig) -> bool:
    """Whether any distillation term has a weight above 0 (from the configuration)."""
    distill = config.distill
    if config.kind != "distill" or distill is None:
        return False
    output = resolve_output_term(distill)
    weights = list(feature_weights(distill).values()) + ([output.weight] if output else [])
    return any(weight > 0 for weight in weights)


def _unlabelled_folder(config: RunConfig, dataset: DatasetIndex) -> list[Case]:
    """The cases of the ``distill.unlabelled`` folder (none for none and train), their
    patients set apart from the dataset's; MTKDError naming the key when a case id is also
    one of the dataset's."""
    setting = config.unlabelled_images()
    if setting in (UNLABELLED_NONE, UNLABELLED_TRAIN):
        return []
    try:
        cases = load_unlabelled(setting)
    except MTKDError as error:
        problem = f"config key 'distill.unlabelled': {error.problem}"
        raise MTKDError(problem, error.path) from None
    known = {case.case_id: case for case in dataset.cases}
    both = [case for case in cases if case.case_id in known]
    if both:
        shown = ", ".join(
            f"{case.case_id} ({case.image} and {known[case.case_id].image})" for case in both[:5]
        )
        raise MTKDError(
            "config key 'distill.unlabelled': case id(s) that data.source also has: "
            f"{shown}{' ...' if len(both) > 5 else ''}; rename the unlabelled image(s)",
            Path(setting),
        )
    return [replace(case, patient_id=UNLABELLED_PATIENT + case.patient_id) for case in cases]


def _check_no_leak(fingerprint: dict[str, Any], split: Split, extra_cases: list[Case]) -> None:
    """MTKDError when an image of the ``distill.unlabelled`` folder has the content of a
    validation or test case's image (from the fingerprint's SHA-256)."""
    if not extra_cases:
        return
    cases = fingerprint["data"]["cases"]
    held_out = {
        json.dumps(cases[case_id]["image"], sort_keys=True): case_id
        for case_id in split.val + split.test
    }
    for case_id, entry in (fingerprint["unlabelled"] or {}).items():
        twin = held_out.get(json.dumps(entry["image"], sort_keys=True))
        if twin is not None:
            part = "validation" if twin in split.val else "test"
            image = next(case.image for case in extra_cases if case.case_id == case_id)
            raise MTKDError(
                f"config key 'distill.unlabelled': image {case_id} is the image of "
                f"{part} case {twin}: a held-out case must not be trained on",
                image,
            )


def _check_fingerprint(
    config: RunConfig,
    dataset: DatasetIndex,
    extra_cases: list[Case],
    run_dir: RunDir,
    resume: bool,
    log: Callable[[str], None],
    events: EventLog,
) -> dict[str, Any]:
    """A new run records what it trains on (``fingerprint.json``); a resumed run is refused
    when its cases' files, its teacher or its anchor changed since (one made by an older mtkd,
    without a fingerprint, resumes with a warning and records one now). Returns the
    fingerprint."""
    distill = config.distill
    teacher = distill.teacher if config.kind == "distill" and distill else None
    started = time.perf_counter()
    folder = config.unlabelled_images() not in (UNLABELLED_NONE, UNLABELLED_TRAIN)
    anchor = distill.anchor.model if teacher and distill.anchor else None
    current = run_fingerprint(dataset, teacher, extra_cases if folder else None, anchor)
    seconds = time.perf_counter() - started
    if seconds > 10:  # reading every file once: say where the time went
        log(f"[{config.name}] hashed the data and teacher files in {seconds:.0f} s")
    if resume:
        recorded = read_fingerprint(run_dir.fingerprint)
        if recorded is not None:
            differences = fingerprint_differences(recorded, current)
            if differences:
                raise MTKDError(
                    "cannot resume: what this run trains on changed since it started: "
                    f"{'; '.join(differences)}. Put the data and teacher back as they "
                    "were, or start a new run (another --run-dir) on the new ones",
                    run_dir.root,
                )
            return current
        message = (
            "warning: this run has no fingerprint.json (an older mtkd made it), so its data "
            "and teacher cannot be checked against those it started with; recording them "
            "now for later resumes"
        )
        log(message)
        events.emit("log", message=message)
    run_dir.write_json(run_dir.fingerprint, current)
    return current


def _precomputed_teacher(config: RunConfig) -> bool:
    """Whether the run precomputes its teacher network's logits (distill.teacher_targets)."""
    if config.kind != "distill" or config.distill is None:
        return False
    stored = is_stored_teacher(config.distill.teacher)
    return teacher_targets(config.distill, stored) == PRECOMPUTED


def _stored_teacher(
    config: RunConfig,
    labels: LabelTable,
    activation: str,
    prep: Preprocessing,
    device: torch.device,
    log: Callable[[str], None],
    sample_ids: list[str],
) -> tuple[TeacherSource | None, StoredOutputs | None]:
    """A stored-outputs teacher, and its outputs when the output term weighs (their cases
    checked against the training samples'); Nones for a teacher network or no teacher."""
    distill = config.distill
    if config.kind != "distill" or not distill or not is_stored_teacher(distill.teacher):
        return None, None
    source = open_teacher(config, labels, activation, prep, device, log)
    if source is None or source.stored is None:
        return source, None
    output = resolve_output_term(distill)
    if output is not None and output.weight > 0:  # else the baseline: no teacher data
        source.stored.check_cases(sample_ids)
        return source, source.stored
    return source, None
