"""One training loop for teachers, plain students and distillation.

The loop is the same for all three; only the per-batch loss differs:

- teacher (``kind: train`` with ``multitask.reconstruction`` masked/unmasked): segmentation
  loss + weight x MSE of the reconstruction of the (masked) input;
- plain network (``kind: train``, reconstruction none): segmentation loss;
- distillation (``kind: distill``): segmentation loss + the Distiller's weighted terms. With
  every distillation weight at zero this is exactly the plain recipe (the no-KD baseline).
  The teacher is a network or another tool's stored outputs (see
  :mod:`mtkd.engine.teacher_source`); stored outputs travel with the batches, aligned with
  the images, and feed the output term without a teacher pass.

Every epoch is reseeded from (seed, epoch), so a run resumed from a checkpoint continues as if
it had never stopped; a stop in the middle of an epoch replays the epoch's data order up to
the step it had reached.

``model.init_from`` starts a new run from a previous model's weights (same network and labels):
they are validated once before the first epoch (``initial_val_dice`` in the "initial_validation"
status event, the final metrics and ``lineage.previous``); a resumed run takes its weights,
that Dice and the lineage from its checkpoint, not from the previous model.

Under ``torchrun`` (see :mod:`mtkd.engine.distributed`) every process runs this loop on its
shard of each epoch's samples, with the per-batch loss wrapped in DistributedDataParallel
(gradients of the student and the connectors all-reduced, the frozen teacher replicated);
epoch terms and validation Dice are reduced over the processes, and only rank 0 writes the run
folder. ``train.batch_size`` is per process.

Images without labels (``distill.unlabelled``): the run's training samples are those of the
labelled training cases (``train_on``) and of the unlabelled ones, in one list; an epoch is one
pass over all of them in a random order, so each batch mixes labelled and unlabelled samples in
their proportion (on average). The segmentation loss covers the labelled samples of a batch,
the distillation terms all of them (:mod:`mtkd.engine.step`). ``train_on: none`` leaves no
labels: teacher targets only. Validation is on the labelled validation cases.

Early stopping (``train.patience``): after that many validation checks without a better
validation Dice the run stops, exports its best model and records why (a "stopped_early" status
event); the count is in the checkpoints, and resuming a run that stopped early trains no more.

One process writes a run folder at a time: the run holds ``RUN/.mtkd.lock``
(:mod:`mtkd.folder_lock`) from before it touches the folder until it ends, however it ends.
A run records what it trains on (``RUN/fingerprint.json``: its cases' files and its teacher,
:mod:`mtkd.engine.fingerprint`); a resume is refused, naming the difference, when they changed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from mtkd.config import PATH_KEYS, UNLABELLED_NONE, UNLABELLED_TRAIN, RunConfig
from mtkd.data.atomic import missing_folders, remove_if_empty
from mtkd.data.datasets import Case, DatasetIndex, load_dataset, load_unlabelled
from mtkd.data.loading import PatchDataset, SliceDataset, VolumeCache
from mtkd.data.preprocess import Preprocessing
from mtkd.data.splits import Split, split_cases
from mtkd.devices import autocast_for, resolve_device, seed_everything
from mtkd.distill.distiller import Distiller
from mtkd.distill.presets import feature_weights, resolve_output_term, resolve_terms
from mtkd.engine.distributed import Distributed, shard_indices
from mtkd.engine.fingerprint import fingerprint_differences, read_fingerprint, run_fingerprint
from mtkd.engine.optim import build_optimizer, build_scheduler
from mtkd.engine.seg_loss import SegmentationLoss
from mtkd.engine.signals import StopRequest, stop_file
from mtkd.engine.step import IGNORE_LABEL, TrainingStep
from mtkd.engine.teacher_source import (
    TeacherSource,
    check_feature_terms,
    is_stored_teacher,
    resolve_teacher,
    teacher_transform,
)
from mtkd.errors import MTKDError
from mtkd.folder_lock import FolderLock, FolderLocked
from mtkd.infer.inference import (
    predict_volume,
    probabilities_to_labels,
    repeat_channels,
)
from mtkd.metrics import dice_per_structure, nanmean
from mtkd.modelfiles.checkpoint import load_checkpoint, save_checkpoint
from mtkd.modelfiles.model_io import (
    FORMAT_VERSION,
    LoadedModel,
    build_from_spec,
    export_model,
    load_model,
)
from mtkd.models import count_parameters, network_info
from mtkd.run_folder import EventLog, RunDir

CHECKPOINT_FORMAT = 1
RANK_SEED_STRIDE = 1_000_003  # per-rank offset of the augmentation, dropout and mask seeds
# the patient ids of the cases of a distill.unlabelled folder start with this (other subjects
# than the dataset's, whatever their names)
UNLABELLED_PATIENT = "unlabelled/"


class TrainingInterrupted(Exception):
    """Raised after a stop request once the checkpoint is saved."""


@dataclass
class RunResult:
    run_dir: Path
    epochs: int  # the epochs trained: train.epochs, or fewer when it stopped early
    best_metric: float
    best_epoch: int
    model_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    # validation Dice of the model.init_from weights before the first epoch (None without)
    initial_val_dice: float | None = None


def _spacing(spacing: tuple[float, ...] | None) -> tuple[float, ...] | None:
    """Spacing rounded to 1 µm for comparison (None keeps each image's own spacing)."""
    return None if spacing is None else tuple(round(float(s), 3) for s in spacing)


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


class Trainer:
    """Runs one configured training or distillation in a run folder."""

    def __init__(
        self,
        config: RunConfig,
        run_dir: str | Path,
        *,
        resume: bool = False,
        progress: bool | None = None,
        log=print,
    ):
        self.config = config.with_absolute_paths()  # the run no longer needs the working dir
        self.run_dir = RunDir(run_dir)
        self.resume = resume
        self.dist = Distributed.from_environment()
        main = self.dist.is_main
        self.progress = main and (sys.stderr.isatty() if progress is None else progress)
        self.log = log if main else _silent
        # SIGINT/SIGTERM or the file RUN/STOP ask to stop at the next safe point; rank 0
        # removes a stop file left from before
        self.stop = StopRequest(stop_file(self.run_dir.root), clear=main)
        self.device = self.dist.device(resolve_device(config.train.device))
        self.events = EventLog(self.run_dir.events, enabled=main)

    # ----------------------------------------------------------------- set-up
    def _prepare_data(self) -> None:
        data = self.config.data
        self.dataset: DatasetIndex = load_dataset(data.source, labels_json=data.labels_json)
        self.extra_cases = self._unlabelled_folder()
        error = None
        if self.dist.is_main:
            try:
                self._check_fingerprint()
            except MTKDError as problem:
                error = problem
        self._on_every_rank(error, "rank 0 refused the run's data or teacher")
        if data.structures:
            self.labels, self.mapping = self.dataset.labels.select(data.structures)
        else:
            self.labels = self.dataset.labels
            self.mapping = {value: value for value in self.dataset.labels.label_values}
        self.activation = output_activation(data.output, len(self.labels))
        self.prep = Preprocessing.from_config(data)
        if self.resume and self.run_dir.split.is_file():
            self.split = Split.from_dict(json.loads(self.run_dir.split.read_text()))
        else:
            split = self.config.split
            self.split = split_cases(
                self.dataset.cases,
                val_fraction=split.val_fraction,
                test_fraction=split.test_fraction,
                seed=split.seed,
                student_fraction=split.student_fraction,
                fixed=split.fixed,
            )
            if self.dist.is_main:
                self.run_dir.write_json(self.run_dir.split, self.split.to_dict())
        self.train_ids = labelled_training_cases(self.split, self.config.train_on)
        self.unlabelled_ids = self._unlabelled_ids()
        if self.unlabelled_ids and not self._distills():
            if not self.train_ids:
                raise MTKDError(
                    "train_on: none (no labels) needs distillation terms with a weight above "
                    "0; every weight is 0 here",
                    self.config.origin.file if self.config.origin else None,
                )
            self.log(
                f"[{self.config.name}] every distillation weight is 0 (the no-KD baseline): "
                "the unlabelled images (distill.unlabelled), which only distillation uses, are "
                "left out"
            )
            self.unlabelled_ids = []
        error = None
        if self.dist.is_main and self.extra_cases:
            try:
                self._check_no_leak()
            except MTKDError as problem:
                error = problem
        self._on_every_rank(error, "rank 0 refused the unlabelled images")
        sample_ids = self.train_ids + self.unlabelled_ids
        # Stored teacher outputs are opened here, to be cached with the cases; a teacher network
        # is loaded after the student is built (_prepare_model), so the student's random
        # initialisation is the same as without a teacher.
        distill = self.config.distill
        self.source: TeacherSource | None = None
        if self.config.kind == "distill" and distill and is_stored_teacher(distill.teacher):
            self.source = self._open_teacher()
        stored = None
        if self.source is not None and self.source.stored is not None:
            output = resolve_output_term(self.config.distill)
            if output is not None and output.weight > 0:  # else the baseline: no teacher data
                stored = self.source.stored
                stored.check_cases(sample_ids)
        self.cache = VolumeCache(
            self.dataset.cases + self.extra_cases,
            self.dataset.labels,
            self.mapping,
            self.prep,
            teacher=stored,
            teacher_cases=sample_ids,
            unlabelled=self.unlabelled_ids,
        )
        if data.dims == 2:
            self.train_set = SliceDataset(self.cache, sample_ids, data.augment)
        else:
            self.train_set = PatchDataset(
                self.cache,
                sample_ids,
                self.prep.patch_size,
                len(self.labels) + 1,
                data.patches_per_volume,
                data.augment,
            )

    def _distills(self) -> bool:
        """Whether any distillation term has a weight above 0 (from the configuration)."""
        distill = self.config.distill
        if self.config.kind != "distill" or distill is None:
            return False
        output = resolve_output_term(distill)
        weights = list(feature_weights(distill).values()) + ([output.weight] if output else [])
        return any(weight > 0 for weight in weights)

    def _unlabelled_setting(self) -> str:
        distill = self.config.distill
        if self.config.kind != "distill" or distill is None:
            return UNLABELLED_NONE
        return distill.unlabelled

    def _unlabelled_folder(self) -> list[Case]:
        """The cases of the ``distill.unlabelled`` folder (none for none and train), their
        patients set apart from the dataset's; MTKDError naming the key when a case id is also
        one of the dataset's."""
        setting = self._unlabelled_setting()
        if setting in (UNLABELLED_NONE, UNLABELLED_TRAIN):
            return []
        try:
            cases = load_unlabelled(setting)
        except MTKDError as error:
            problem = f"config key 'distill.unlabelled': {error.problem}"
            raise MTKDError(problem, error.path) from None
        known = {case.case_id: case for case in self.dataset.cases}
        both = [case for case in cases if case.case_id in known]
        if both:
            shown = ", ".join(
                f"{case.case_id} ({case.image} and {known[case.case_id].image})"
                for case in both[:5]
            )
            raise MTKDError(
                "config key 'distill.unlabelled': case id(s) that data.source also has: "
                f"{shown}{' ...' if len(both) > 5 else ''}; rename the unlabelled image(s)",
                Path(setting),
            )
        return [replace(case, patient_id=UNLABELLED_PATIENT + case.patient_id) for case in cases]

    def _check_no_leak(self) -> None:
        """MTKDError when an image of the ``distill.unlabelled`` folder has the content of a
        validation or test case's image (from the fingerprint's SHA-256)."""
        cases = self.fingerprint["data"]["cases"]
        held_out = {
            json.dumps(cases[case_id]["image"], sort_keys=True): case_id
            for case_id in self.split.val + self.split.test
        }
        for case_id, entry in (self.fingerprint["unlabelled"] or {}).items():
            twin = held_out.get(json.dumps(entry["image"], sort_keys=True))
            if twin is not None:
                part = "validation" if twin in self.split.val else "test"
                image = next(case.image for case in self.extra_cases if case.case_id == case_id)
                raise MTKDError(
                    f"config key 'distill.unlabelled': image {case_id} is the image of "
                    f"{part} case {twin}: a held-out case must not be trained on",
                    image,
                )

    def _unlabelled_ids(self) -> list[str]:
        """The case ids of the unlabelled training images (``distill.unlabelled``)."""
        if self._unlabelled_setting() == UNLABELLED_TRAIN:
            return unlabelled_training_cases(self.split, self.config.train_on)
        return [case.case_id for case in self.extra_cases]

    def _check_fingerprint(self) -> None:
        """A new run records what it trains on (``fingerprint.json``); a resumed run is refused
        when its cases' files or its teacher changed since (one made by an older mtkd, without
        a fingerprint, resumes with a warning and records one now)."""
        distill = self.config.distill
        teacher = distill.teacher if self.config.kind == "distill" and distill else None
        started = time.perf_counter()
        folder = self._unlabelled_setting() not in (UNLABELLED_NONE, UNLABELLED_TRAIN)
        current = run_fingerprint(self.dataset, teacher, self.extra_cases if folder else None)
        self.fingerprint = current
        seconds = time.perf_counter() - started
        if seconds > 10:  # reading every file once: say where the time went
            self.log(f"[{self.config.name}] hashed the data and teacher files in {seconds:.0f} s")
        if self.resume:
            recorded = read_fingerprint(self.run_dir.fingerprint)
            if recorded is not None:
                differences = fingerprint_differences(recorded, current)
                if differences:
                    raise MTKDError(
                        "cannot resume: what this run trains on changed since it started: "
                        f"{'; '.join(differences)}. Put the data and teacher back as they "
                        "were, or start a new run (another --run-dir) on the new ones",
                        self.run_dir.root,
                    )
                return
            message = (
                "warning: this run has no fingerprint.json (an older mtkd made it), so its data "
                "and teacher cannot be checked against those it started with; recording them "
                "now for later resumes"
            )
            self.log(message)
            self.events.emit("log", message=message)
        self.run_dir.write_json(self.run_dir.fingerprint, current)

    def _out_channels(self) -> int:
        return 1 if self.activation == "sigmoid" else len(self.labels) + 1

    def _network_spec(self) -> dict[str, Any]:
        params = dict(self.config.model.params)
        params.update(
            in_channels=self.prep.in_channels,
            out_channels=self._out_channels(),
            spatial_dims=self.prep.dims,
        )
        reconstruction = (
            self.config.multitask.reconstruction if self.config.kind == "train" else "none"
        )
        spec = {"name": self.config.model.name, "params": params, "reconstruction": reconstruction}
        if reconstruction != "none":
            spec["mask_ratio"] = self.config.multitask.mask_ratio
            spec["mask_patch"] = self.config.multitask.mask_patch
        return spec

    def _example_input(self) -> torch.Tensor:
        size = self.prep.slice_size if self.prep.dims == 2 else self.prep.patch_size
        return torch.zeros(2, self.prep.in_channels, *size, device=self.device)

    def _open_teacher(self) -> TeacherSource | None:
        """The distillation teacher, checked against this run (None for a training run)."""
        distill = self.config.distill
        if self.config.kind != "distill" or distill is None:
            return None
        source = resolve_teacher(
            distill.teacher, self.labels, self.device, labels_json=self.config.data.labels_json
        )
        check_feature_terms(source, distill)
        if source.model is not None:
            self._check_teacher(source.model)
        return source

    def _prepare_model(self) -> None:
        self.spec = self._network_spec()
        spec = self.spec
        self.network = build_from_spec(spec).to(self.device)
        # model.init_from: its weights start a new run; a resumed run has them in its checkpoint
        # (and the lineage and initial Dice in its state, see _restore).
        self.previous: dict[str, Any] | None = None
        self.initial_val_dice: float | None = None
        if self.config.model.init_from and not self.resume:
            self.previous = self._init_from(self.config.model.init_from)
        self.teacher: LoadedModel | None = None
        self.distiller: Distiller | None = None
        distill = self.config.distill
        if self.source is None:
            self.source = self._open_teacher()
        source = self.source
        if source is not None and distill is not None:
            self.teacher = source.model
            if source.has_taps:
                pairs, output = self._terms(source, spec)
            else:
                pairs, output = [], resolve_output_term(distill)
            weights = [pair.weight for pair in pairs] + ([output.weight] if output else [])
            if any(weight > 0 for weight in weights):
                self.distiller = self._distiller(source, pairs, output).to(self.device)
            # else: every weight is zero, the no-KD baseline: the same recipe, no teacher pass
        trainable = (
            self.distiller.trainable_parameters() if self.distiller else self.network.parameters()
        )
        self.optimizer = build_optimizer(self.config.train, trainable)
        self.scheduler = build_scheduler(self.config.train, self.optimizer)
        use_scaler = (
            self.device.type == "cuda"
            and self.config.train.amp
            and not torch.cuda.is_bf16_supported()
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.seg_loss = SegmentationLoss(self.config.train.seg_loss, self.activation)
        step = TrainingStep(
            self.distiller or self.network,
            self.seg_loss,
            seg_weight=self.config.train.seg_weight,
            activation=self.activation,
            reconstruction=self.spec["reconstruction"],
            reconstruction_weight=self.config.multitask.weight,
            reconstruction_loss_on=self.config.multitask.reconstruction_loss_on,
        )
        # every trainable parameter is used by every step (Testing/engine/test_distributed.py), so
        # DDP needs no search for unused ones
        self.step: torch.nn.Module = (
            DistributedDataParallel(
                step, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            if self.dist.enabled
            else step
        )

    def _init_from(self, path: str) -> dict[str, Any]:
        """Load the weights of the previous model at ``path`` into the new network; its network
        (name, params) and labels must be this run's. Returns its lineage record."""
        previous = load_model(path)  # SHA-256 checked, weights_only
        theirs, ours = previous.metadata.get("network", {}), self.spec
        differences = _network_differences(theirs, ours)
        if differences:
            raise MTKDError(
                "model.init_from: the previous model's network differs from this run's "
                f"({'; '.join(differences)}; previous vs this run)",
                previous.folder,
            )
        if list(previous.labels.names) != list(self.labels.names):
            raise MTKDError(
                "model.init_from: the previous model's labels differ from this run's "
                f"(previous {list(previous.labels.names)}, this run {list(self.labels.names)})",
                previous.folder,
            )
        try:
            self.network.load_state_dict(previous.network.state_dict())
        except RuntimeError as error:
            raise MTKDError(
                f"model.init_from: weights do not fit this run's network ({error})",
                previous.folder,
            ) from None
        for what, a, b in (
            ("HU window", list(previous.prep.hu_window), list(self.prep.hu_window)),
            ("spacing", _spacing(previous.prep.spacing), _spacing(self.prep.spacing)),
        ):
            if a != b:
                self.log(
                    f"warning: the previous model (model.init_from) was trained with {what} "
                    f"{a}, this run uses {b}"
                )
        return {
            "path": str(previous.folder.resolve()),
            "name": previous.name,
            "weights_sha256": previous.metadata.get("weights_sha256"),
            "val_dice_on_this_run": None,
        }

    def _initial_validation(self) -> None:
        """Validate the previous model's weights once before the first epoch of a new run."""
        if self.previous is None or not self.split.val:
            return
        scores = self.validate()
        self.initial_val_dice = scores["val_dice"]
        self.previous["val_dice_on_this_run"] = self.initial_val_dice
        self.events.emit("status", state="initial_validation", **scores)
        self.log(
            f"[{self.config.name}] initial val_dice={self.initial_val_dice:.4f} "
            "(model.init_from, before training)"
        )

    def _terms(self, source: TeacherSource, spec: dict[str, Any]):
        """Tap pairs and output term for a teacher network with taps."""
        distill = self.config.distill
        try:
            return resolve_terms(distill, spec, source.model.metadata["network"])
        except MTKDError as error:
            if distill.preset is None or source.kind != "bundle":
                raise
            raise MTKDError(
                f"preset '{distill.preset}' finds the E/B/D taps of registered networks only "
                f"({error.problem}); give distill.pairs with the bundle network's module names",
                source.path,
            ) from None

    def _distiller(self, source: TeacherSource, pairs, output) -> Distiller:
        if source.model is None:  # stored outputs: the batches carry the teacher's maps
            return Distiller(
                self.network, None, [], output, self._example_input(), ignore_index=IGNORE_LABEL
            )
        return Distiller(
            self.network,
            source.model.network,
            pairs,
            output,
            self._example_input(),
            teacher_transform=teacher_transform(source.model, self.labels, self.activation),
            teacher_in_channels=source.model.prep.in_channels,
            ignore_index=IGNORE_LABEL,  # the labels of unlabelled samples (supcon)
        )

    def _check_teacher(self, teacher: LoadedModel) -> None:
        """The teacher must segment every student structure (by name) in the student's dims."""
        teacher_transform(teacher, self.labels, self.activation)  # MTKDError if one is missing
        if teacher.prep.dims != self.prep.dims:
            raise MTKDError(
                f"teacher is {teacher.prep.dims}-D, the student {self.prep.dims}-D", teacher.folder
            )
        if _spacing(teacher.prep.spacing) != _spacing(self.prep.spacing):
            raise MTKDError(
                f"the teacher works at spacing {teacher.prep.spacing} mm, this run's data.spacing "
                f"is {self.prep.spacing}: the teacher would see the wrong scale; set data.spacing "
                "to the teacher's",
                path=teacher.folder,
            )
        if tuple(teacher.prep.hu_window) != tuple(self.prep.hu_window):
            self.log(
                f"warning: the teacher was trained with HU window {list(teacher.prep.hu_window)}, "
                f"this run uses {list(self.prep.hu_window)}; the teacher sees this run's input "
                "(set data.hu_window to the teacher's to match it)"
            )

    # ------------------------------------------------------------- checkpoint
    def _state(self, epoch: int, step_in_epoch: int) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "kind": self.config.kind,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "model": self.network.state_dict(),
            "connectors": self.distiller.connectors.state_dict() if self.distiller else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "scaler": self.scaler.state_dict(),
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "stale_checks": self.stale_checks,
            "stopped_early": self.stopped_early,
            "history": self.history,
            "previous": self.previous,
            "initial_val_dice": self.initial_val_dice,
            "model_metadata": self._model_metadata(),
            "world_size": self.dist.world_size,
        }

    def _model_metadata(self) -> dict[str, Any]:
        """What ``export_model`` writes to ``mtkd_model.json`` (less the weights' SHA-256 and
        creation time), so that a checkpoint can be opened as a model."""
        return {
            "format_version": FORMAT_VERSION,
            "name": self.config.name,
            "network": self.spec,
            "parameters": count_parameters(self.network),
            "labels": self.labels.to_dict(),
            "activation": self.activation,
            "preprocessing": self.prep.to_dict(),
            "lineage": self._lineage(),
            "metrics": {},
        }

    def _lineage(self) -> dict[str, Any]:
        lineage: dict[str, Any] = {
            "kind": self.config.kind,
            "run": str(self.run_dir.root.resolve()),
            "distilled": self.distiller is not None,  # False for the no-KD baseline
        }
        if self.source is not None:
            lineage["teacher"] = self.source.lineage()
        if self.previous is not None:
            lineage["previous"] = dict(self.previous)
        return lineage

    def _restore(self) -> tuple[int, int]:
        path = self.run_dir.last_checkpoint
        if not path.is_file():
            raise MTKDError(
                "cannot resume: no checkpoint (checkpoints/last.pt) in this run", self.run_dir.root
            )
        state = load_checkpoint(path)
        if state.get("kind") != self.config.kind:
            raise MTKDError("checkpoint belongs to a different kind of run", path=path)
        try:
            self.network.load_state_dict(state["model"])
            if self.distiller is not None:
                self.distiller.connectors.load_state_dict(state["connectors"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as error:
            raise MTKDError(
                f"checkpoint does not match this run's configuration ({error})", path
            ) from None
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.best_metric = float(state["best_metric"])
        self.best_epoch = int(state["best_epoch"])
        self.stale_checks = int(state.get("stale_checks", 0))
        self.stopped_early = state.get("stopped_early")
        self.history = list(state.get("history", []))
        self.previous = state.get("previous")
        self.initial_val_dice = state.get("initial_val_dice")
        epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
        saved_by = int(state.get("world_size", 1))
        if step and saved_by != self.dist.world_size:
            self.log(
                f"warning: the checkpoint was saved in the middle of epoch {epoch + 1} by "
                f"{saved_by} process(es), this run has {self.dist.world_size}: that epoch's "
                "sample order differs, so it starts again from its beginning"
            )
            step = 0
        return epoch, step

    # ------------------------------------------------------------------ steps
    def _batch_loss(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator,
        teacher: torch.Tensor | None = None,
        has_label: torch.Tensor | None = None,
        subject: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and unweighted terms of one batch (see :class:`TrainingStep`), through DDP
        under torchrun."""
        return self.step(images, labels, generator, teacher, has_label, subject)

    def _epoch_seed(self, epoch: int) -> int:
        """The seed of an epoch's sample order: the same on every rank."""
        return self.config.train.seed * 100_003 + epoch

    def _rank_seed(self, base: int) -> int:
        """A seed of this rank's own draws (augmentation, dropout, masks); ``base`` alone."""
        return base + RANK_SEED_STRIDE * self.dist.rank

    def _loader(self, epoch: int) -> tuple[DataLoader, list[int]]:
        """The epoch's loader over this rank's shard of the samples, and that shard."""
        seed = self._epoch_seed(epoch)
        self.train_set.reseed(self._rank_seed(seed))
        shard = shard_indices(len(self.train_set), seed, self.dist.rank, self.dist.world_size)
        batch = self.config.train.batch_size
        drop_last = self.config.train.drop_last and len(shard) >= batch
        loader = DataLoader(
            self.train_set,
            batch_size=min(batch, len(shard)),
            sampler=shard,
            drop_last=drop_last,
            generator=torch.Generator().manual_seed(self._rank_seed(seed)),
            num_workers=self.config.train.num_workers,
        )
        return loader, shard

    def _stop_agreed(self) -> bool:
        """Whether any process was asked to stop; called by every rank at the same step."""
        return self.dist.any(self.stop.requested, self.device)

    def _train_epoch(self, epoch: int, skip_steps: int) -> dict[str, float] | None:
        """One epoch; returns the mean terms over all processes and the number of samples
        seen ("samples"), or None when stopped (after saving a checkpoint)."""
        cfg = self.config.train
        seed_everything(self._rank_seed(self._epoch_seed(epoch)))
        mask_generator = torch.Generator(device=self.device).manual_seed(
            self._rank_seed(cfg.seed * 7919 + epoch)
        )
        loader, shard = self._loader(epoch)
        if self.dist.enabled:
            self.events.emit("shards", epoch=epoch + 1, samples=self.dist.gather(shard))
        self.step.train()
        sums: dict[str, float] = {}
        count = samples = 0
        batches = tqdm(
            loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not self.progress
        )
        self.optimizer.zero_grad(set_to_none=True)
        for step, batch in enumerate(batches):
            if step < skip_steps:  # replaying the data order of an interrupted epoch
                if self.distiller is None and self.spec["reconstruction"] == "masked":
                    # and the mask draws of its steps, so that later masks are the same
                    self.network.mask_patches(batch["image"], generator=mask_generator)
                continue
            images = repeat_channels(batch["image"], self.prep.in_channels).to(self.device)
            labels = batch["label"].to(self.device)
            teacher = batch["teacher"].to(self.device) if "teacher" in batch else None
            has_label = batch["has_label"].to(self.device)
            subject = batch["subject"].to(self.device)
            boundary = (step + 1) % cfg.grad_accum == 0 or step + 1 == len(loader)
            with self._gradient_sync(boundary):
                with autocast_for(self.device, cfg.amp):
                    loss, terms = self._batch_loss(
                        images, labels, mask_generator, teacher, has_label, subject
                    )
                if not torch.isfinite(loss):
                    raise MTKDError(
                        f"training diverged: loss is {loss.item()} at epoch {epoch + 1}"
                    )
                self.scaler.scale(loss / cfg.grad_accum).backward()
            if boundary:
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
            for key, value in {"loss": loss.detach(), **terms}.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            count += 1
            samples += len(images)
            if self.progress:
                batches.set_postfix(loss=f"{float(loss):.4f}")
            if boundary and step + 1 < len(loader) and self._stop_agreed():
                self._save_last(epoch, step + 1)
                return None
        totals = self.dist.sum({**sums, "_batches": count, "_samples": samples}, self.device)
        batches_total = max(totals.pop("_batches"), 1)
        samples_total = int(totals.pop("_samples"))
        return {
            **{key: value / batches_total for key, value in totals.items()},
            "samples": samples_total,
        }

    def _gradient_sync(self, boundary: bool):
        """DDP all-reduces the gradients at the accumulation boundary only."""
        if isinstance(self.step, DistributedDataParallel) and not boundary:
            return self.step.no_sync()
        return contextlib.nullcontext()

    def validate(self) -> dict[str, Any]:
        """Per-volume Dice on the validation cases (preprocessed grid); under torchrun each
        process scores its share of the cases and every process gets all the scores."""
        names = list(self.labels.names)
        mine = []
        for case_id in self.split.val[self.dist.rank :: self.dist.world_size]:
            case = self.cache[case_id]
            probabilities = predict_volume(
                self.network,
                case.image,
                self.prep,
                self.activation,
                self.device,
                amp=self.config.train.amp,
            )
            prediction = probabilities_to_labels(probabilities, self.activation).numpy()
            mine.append(dice_per_structure(prediction, case.label[0].numpy(), len(names)))
        per_volume = [scores for shares in self.dist.gather(mine) for scores in shares]
        per_structure = {
            name: nanmean([scores[i] for scores in per_volume]) for i, name in enumerate(names)
        }
        return {
            "val_dice": nanmean(list(per_structure.values())),
            "val_dice_per_structure": per_structure,
        }

    def _save_last(self, epoch: int, step_in_epoch: int) -> None:
        """Rank 0 writes ``last.pt``; the others wait until it is complete."""
        if self.dist.is_main:
            save_checkpoint(self._state(epoch, step_in_epoch), self.run_dir.last_checkpoint)
        self.dist.barrier()

    # -------------------------------------------------------------------- run
    def run(self) -> RunResult:
        """Train to the configured number of epochs; export the model; return the result.

        The run folder is locked for the whole run (rank 0 holds the lock; every rank stops if
        it cannot be taken): a second process on the same folder gets FolderLocked naming
        the holder, and writes nothing there."""
        created = missing_folders(self.run_dir.root)
        lock = FolderLock(self.run_dir.root, self._purpose()) if self.dist.is_main else None
        refused: FolderLocked | None = None
        if lock is not None:
            try:
                lock.acquire()
            except FolderLocked as error:
                if not self.dist.enabled:
                    raise
                refused = error
        try:
            return self._locked_run(refused)
        finally:
            if lock is not None:
                lock.release()
            remove_if_empty(created)  # the folders of a run refused at its start

    def _locked_run(self, refused: FolderLocked | None) -> RunResult:
        try:
            self.dist.start(self.device)
            self._on_every_rank(refused, "rank 0 could not lock the run folder")
            with self.stop:
                return self._run()
        except (TrainingInterrupted, FolderLocked):
            raise
        except Exception as error:
            if self.run_dir.config.exists():  # a run that never started has no events file
                message = str(error) if isinstance(error, MTKDError) else repr_error(error)
                self.events.emit("error", message=message)
            raise
        finally:
            self.dist.stop()

    def _purpose(self) -> str:
        return f"mtkd {self.config.kind}{' --resume' if self.resume else ''}"

    def _on_every_rank(self, error: MTKDError | None, others: str) -> None:
        """Raise ``error`` on rank 0 and an error saying ``others`` on the other ranks when
        rank 0 had one (``error`` is only known there); nothing when it had none."""
        if self.dist.any(error is not None, self.device):
            raise error or MTKDError(f"{others}; see rank 0's message", self.run_dir.root)

    def _run(self) -> RunResult:
        cfg = self.config
        if self.resume:
            stored = self.run_dir.load_config()
            if stored.to_dict() != cfg.to_dict():
                raise MTKDError(
                    "the run's config.yaml differs from the configuration given", self.run_dir.root
                )
            if self.dist.is_main:
                for path in self.run_dir.remove_stale_temporaries():
                    self.log(f"removed {path.name}, left by a process that was killed")
        # a resumed run has the init_from weights in its checkpoint; only distillation uses
        # a teacher
        skip = {"model.init_from"} if self.resume else set()
        skip |= {"distill.teacher", "distill.unlabelled"} if cfg.kind != "distill" else set()
        needed = [key for key in PATH_KEYS if key not in skip]
        cfg.check_paths(needed, run_dir=self.run_dir.root)  # before a new run writes anything
        if not self.resume and self.dist.is_main:
            self.run_dir.create(cfg)
        self.dist.barrier()  # the folder exists before any other process uses it
        self.events.emit(
            "status",
            state="preparing",
            kind=cfg.kind,
            resume=self.resume,
            pid=os.getpid(),
            host=socket.gethostname(),
            argv=list(sys.argv),
        )
        seed_everything(cfg.train.seed)
        self._prepare_data()
        self.cache.warm(self.train_ids + self.unlabelled_ids + self.split.val)
        self._prepare_model()
        self.best_metric, self.best_epoch, self.history = -math.inf, 0, []
        # early stopping: validation checks since the best one; where and why the run stopped
        self.stale_checks, self.stopped_early = 0, None
        start_epoch, skip_steps = self._restore() if self.resume else (0, 0)
        if cfg.train.patience is not None and not self.split.val:
            raise MTKDError(
                "config key 'train.patience': early stopping needs validation cases, and this "
                "run's split has none",
                cfg.origin.file if cfg.origin else None,
            )
        if self.stopped_early:
            self.log(f"[{cfg.name}] {_stopped_message(self.stopped_early)}: nothing to train")
        if not self.resume:
            self._initial_validation()
        self.events.emit(
            "status",
            state="training",
            start_epoch=start_epoch,
            epochs=cfg.train.epochs,
            train_cases=len(self.train_ids),
            unlabelled_cases=len(self.unlabelled_ids),
            train_samples=len(self.train_set),
            val_cases=len(self.split.val),
            device=str(self.device),
            world_size=self.dist.world_size,
        )
        end_epoch = start_epoch if self.stopped_early else cfg.train.epochs
        for epoch in range(start_epoch, end_epoch):
            started = time.perf_counter()
            means = self._train_epoch(epoch, skip_steps if epoch == start_epoch else 0)
            if means is None:
                self.events.emit(
                    "status", state="interrupted", epoch=epoch, signal=self.stop.signal_name
                )
                raise TrainingInterrupted(
                    f"stopped by {self.stop.signal_name}; resume with --resume"
                )
            if self.scheduler is not None:
                self.scheduler.step()
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "epochs": cfg.train.epochs,
                "lr": self.optimizer.param_groups[0]["lr"],
                "seconds": round(time.perf_counter() - started, 3),
                **{key: round(value, 6) for key, value in means.items()},
            }
            last = epoch + 1 == cfg.train.epochs
            if self.split.val and ((epoch + 1) % cfg.train.val_every == 0 or last):
                record.update(self.validate())
                if record["val_dice"] > self.best_metric:
                    self.best_metric, self.best_epoch = record["val_dice"], epoch + 1
                    self.stale_checks = 0
                    if self.dist.is_main:
                        save_checkpoint(self._state(epoch + 1, 0), self.run_dir.best_checkpoint)
                else:
                    self.stale_checks += 1
            patience = cfg.train.patience
            if not last and patience is not None and self.stale_checks >= patience:
                self.stopped_early = {
                    "epoch": epoch + 1,
                    "best_epoch": self.best_epoch,
                    "patience": patience,
                }
            self.history.append(record)
            self.events.emit("metrics", **record)
            self._print_epoch(record)
            self._save_last(epoch + 1, 0)
            if self.stopped_early:
                message = _stopped_message(self.stopped_early)
                self.events.emit(
                    "status", state="stopped_early", message=message, **self.stopped_early
                )
                self.log(f"[{cfg.name}] {message}")
                break
            if not last and self._stop_agreed():
                self.events.emit(
                    "status", state="interrupted", epoch=epoch + 1, signal=self.stop.signal_name
                )
                raise TrainingInterrupted(
                    f"stopped by {self.stop.signal_name}; resume with --resume"
                )
        return self._finish()

    def _print_epoch(self, record: dict[str, Any]) -> None:
        terms = " ".join(
            f"{k}={v:.4f}"
            for k, v in record.items()
            if k not in {"epoch", "epochs", "lr", "seconds"} and isinstance(v, float)
        )
        self.log(
            f"[{self.config.name}] epoch {record['epoch']}/{record['epochs']} {terms}"
            f" ({record['seconds']:.1f}s)"
        )

    def _finish(self) -> RunResult:
        if self.dist.is_main:
            self._export()
        self.dist.barrier()  # the model is complete before any process reports success
        stopped = self.stopped_early
        return RunResult(
            self.run_dir.root,
            stopped["epoch"] if stopped else self.config.train.epochs,
            self.best_metric,
            self.best_epoch,
            self.run_dir.model,
            self.history,
            self.initial_val_dice,
        )

    def _export(self) -> None:
        """Export the best (else the last) weights to ``model/`` with the report."""
        self.events.emit("status", state="exporting")
        if self.run_dir.best_checkpoint.is_file() and self.best_epoch > 0:
            self.network.load_state_dict(load_checkpoint(self.run_dir.best_checkpoint)["model"])
        lineage = self._lineage()
        metrics = {
            "best_val_dice": self.best_metric if self.best_epoch else None,
            "best_epoch": self.best_epoch,
            "initial_val_dice": self.initial_val_dice,
        }
        export_model(
            self.network,
            self.run_dir.model,
            spec=self.spec,
            labels=self.labels,
            prep=self.prep,
            activation=self.activation,
            lineage=lineage,
            metrics=metrics,
            name=self.config.name,
        )
        self.run_dir.write_json(self.run_dir.report / "history.json", self.history)
        self.events.emit(
            "done", model=str(self.run_dir.model), stopped_early=self.stopped_early, **metrics
        )


def _stopped_message(stopped: dict[str, Any]) -> str:
    """Why a run ended before its last epoch, in words (events and logs)."""
    return (
        f"stopped early at epoch {stopped['epoch']}, best epoch {stopped['best_epoch']} (no "
        f"better validation Dice in {stopped['patience']} validation checks: train.patience)"
    )


def repr_error(error: BaseException) -> str:
    """``Type: message`` for an unexpected error (events and logs)."""
    return f"{type(error).__name__}: {error}"


def _silent(*_args: Any, **_kwargs: Any) -> None:
    """The log of processes other than rank 0."""


def _network_differences(theirs: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """What differs between two network specs: the name, each parameter (defaults filled in,
    so that an explicit default equals an omitted one) and whether there is a reconstruction
    decoder (its weights are part of the network)."""
    if theirs.get("name") != ours.get("name"):
        return [f"network {theirs.get('name')!r} vs {ours.get('name')!r}"]
    try:
        a = network_info(theirs["name"], **theirs.get("params", {})).params
        b = network_info(ours["name"], **ours.get("params", {})).params
    except MTKDError as error:
        return [error.problem]
    a, b = json.loads(json.dumps(a, default=str)), json.loads(json.dumps(b, default=str))
    differences = [
        f"{key} {a.get(key)!r} vs {b.get(key)!r}"
        for key in sorted(set(a) | set(b))
        if a.get(key) != b.get(key)
    ]
    multitask = [spec.get("reconstruction", "none") != "none" for spec in (theirs, ours)]
    if multitask[0] != multitask[1]:
        differences.append(
            f"reconstruction {theirs.get('reconstruction', 'none')!r} vs "
            f"{ours.get('reconstruction', 'none')!r}"
        )
    return differences


def train_run(config: RunConfig, run_dir: str | Path, **options: Any) -> RunResult:
    """Run a configured training or distillation in ``run_dir`` (see :class:`Trainer`)."""
    return Trainer(config, run_dir, **options).run()


def resume_run(run_dir: str | Path, **options: Any) -> RunResult:
    """Continue the run in ``run_dir`` exactly where it stopped."""
    config = RunDir(run_dir).load_config()
    return Trainer(config, run_dir, resume=True, **options).run()


__all__ = ["RunResult", "Trainer", "TrainingInterrupted", "resume_run", "train_run"]
