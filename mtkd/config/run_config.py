"""The whole run configuration, :class:`RunConfig`: its sections, building it from a mapping,
and the checks of values that a type alone cannot make (ranges, names, combinations)."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mtkd.config.mappings import build_dataclass, key_name
from mtkd.config.sections import (
    TRAIN_ON_NONE,
    UNLABELLED_AUTO,
    UNLABELLED_NONE,
    UNLABELLED_TRAIN,
    DataConfig,
    DistillConfig,
    MultiTaskConfig,
    NetworkConfig,
    SplitConfig,
    TrainConfig,
)
from mtkd.config_paths import (
    PATH_KEYS,
    PathOrigin,
    get_key,
    is_path_value,
    missing_path_message,
    resolve_paths,
)
from mtkd.devices import check_device_name
from mtkd.errors import MTKDError

SEED_LIMIT = 2**32 - 1
# dotted key -> (lowest, highest, how the range reads); None: no bound on that side
RANGES: dict[str, tuple[float | None, float | None, str]] = {
    "train.epochs": (1, None, ">= 1"),
    "train.batch_size": (1, None, ">= 1"),
    "train.grad_accum": (1, None, ">= 1"),
    "train.val_every": (1, None, ">= 1"),
    "train.num_workers": (0, None, ">= 0"),
    "train.seed": (0, SEED_LIMIT, f"in [0, {SEED_LIMIT}]"),
    "train.patience": (1, None, ">= 1"),
    "train.seg_weight": (0, None, ">= 0"),
    "train.optimizer.weight_decay": (0, None, ">= 0"),
    "split.seed": (0, SEED_LIMIT, f"in [0, {SEED_LIMIT}]"),
    "data.patches_per_volume": (1, None, ">= 1"),
    "data.in_channels": (1, None, ">= 1"),
    "data.augment.flip_prob": (0, 1, "in [0, 1]"),
    "data.augment.rotate90_prob": (0, 1, "in [0, 1]"),
    "data.augment.prob": (0, 1, "in [0, 1]"),
    "data.augment.intensity_scale": (0, None, ">= 0"),
    "data.augment.intensity_shift": (0, None, ">= 0"),
    "data.augment.noise_std": (0, None, ">= 0"),
    "multitask.weight": (0, None, ">= 0"),
    "multitask.mask_patch": (1, None, ">= 1"),
    "distill.output.weight": (0, None, ">= 0"),
    "distill.anchor.weight": (0, None, ">= 0"),
}


def is_run_name(name: Any) -> bool:
    """A run's name is the name of its folder: one non-empty path component of printable
    text."""
    if not isinstance(name, str) or not name.strip() or not name.isprintable():
        return False
    return name not in (".", "..") and not any(c in name for c in "/\\")


@dataclass
class RunConfig:
    """A whole run. ``kind``: train (teacher or plain student) or distill."""

    kind: Literal["train", "distill"] = "train"
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: NetworkConfig = field(default_factory=NetworkConfig)
    multitask: MultiTaskConfig = field(default_factory=lambda: MultiTaskConfig("none"))
    # whose labels the run trains on: every training patient's, the students' share
    # (split.student_fraction) or none (kind: distill only: teacher targets on
    # distill.unlabelled images)
    train_on: Literal["train", "student_train", "none"] = "train"
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig | None = None
    # where the paths were read from (set by load_config; not a configuration key)
    origin: typing.ClassVar[PathOrigin | None] = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_absolute_paths(self) -> RunConfig:
        """A copy whose paths are absolute (relative ones read from the working directory),
        so that the run no longer depends on it; keeps :attr:`origin`."""
        data, tried = resolve_paths(self.to_dict(), None)
        config = RunConfig.from_dict(data)
        config.origin = self.origin or PathOrigin(None, tried)
        return config

    def check_paths(
        self, keys: typing.Iterable[str] = PATH_KEYS, run_dir: str | Path | None = None
    ) -> None:
        """MTKDError naming the key, the paths tried and the run folder when a path among
        ``keys`` that the configuration sets exists nowhere, or naming the configuration file
        when ``data.source`` (among ``keys``) is not set: an empty path would be read as the
        working directory."""
        keys = list(keys)
        file = self.origin.file if self.origin else None
        for key in keys:
            value = get_key(self.to_dict(), key)
            if is_path_value(value, key) and not Path(value).expanduser().exists():
                message = missing_path_message(key, value, self.origin, run_dir)
                raise MTKDError(message, path=file)
        if "data.source" in keys and not self.data.source.strip():
            raise MTKDError(
                "config key 'data.source' is not set: name the dataset (an MSD folder, images/ "
                "and labels/ folders, an image file or a DICOM series folder)",
                path=file,
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | Path | None = None) -> RunConfig:
        config = build_dataclass(cls, data, "", source)
        if config.kind == "distill" and config.distill is not None:
            config.distill.fill_recommended()
        config.validate(source)
        return config

    def unlabelled_images(self) -> str:
        """``distill.unlabelled`` with ``auto`` resolved: none, train or a folder. ``auto`` is
        train when ``train_on`` leaves training patients without labels (student_train, or
        none) and a distillation term weighs; none otherwise."""
        if self.kind != "distill" or self.distill is None:
            return UNLABELLED_NONE
        setting = self.distill.unlabelled
        if setting != UNLABELLED_AUTO:
            return setting
        if self.train_on == TRAIN_ON_NONE:
            return UNLABELLED_TRAIN
        if self.train_on == "train" or self.distill.scale == 0:
            return UNLABELLED_NONE
        return UNLABELLED_TRAIN

    def validate(self, source: str | Path | None = None) -> None:
        """Check values that a type alone cannot; raise MTKDError naming key and file."""

        def fail(key: str, problem: str) -> None:
            raise MTKDError(f"config key '{key}': {problem}", path=source)

        self._validate_ranges(fail)
        check_device_name(self.train.device, source, "train.device")
        if not is_run_name(self.name):
            fail("name", f"must be a folder name (no '/', '\\', '.' or '..'), got {self.name!r}")
        low, high = (self.data.hu_window + [0, 0])[:2]
        if len(self.data.hu_window) != 2 or not low < high:
            fail("data.hu_window", "must be [low, high] with low < high")
        if len(self.data.slice_size) != 2 or min(self.data.slice_size) < 8:
            fail("data.slice_size", "must be two sizes >= 8")
        if len(self.data.patch_size) != 3 or min(self.data.patch_size) < 8:
            fail("data.patch_size", "must be three sizes >= 8")
        if self.data.spacing is not None and len(self.data.spacing) != 3:
            fail("data.spacing", "must be three values (x, y, z) in mm")
        if not 0 < self.split.student_fraction <= 1:
            fail("split.student_fraction", "must be in (0, 1]")
        if not (0 <= self.split.val_fraction < 1 and 0 <= self.split.test_fraction < 1):
            fail("split", "val_fraction and test_fraction must be in [0, 1)")
        if self.kind == "distill":
            if self.distill is None or not self.distill.teacher:
                fail(
                    "distill.teacher",
                    "a distillation run needs a teacher (model, bundle, checkpoint or outputs)",
                )
            if self.multitask.reconstruction != "none":
                fail("multitask.reconstruction", "students are trained without reconstruction")
        if self.distill is not None and self.distill.scale < 0:
            fail("distill.scale", "must be >= 0")
        for index, pair in enumerate(self.distill.pairs if self.distill else []):
            if not pair.student or not pair.teacher:
                fail(f"distill.pairs[{index}]", "needs both 'student' and 'teacher' tap names")
            if pair.weight < 0 or (pair.temperature is not None and pair.temperature <= 0):
                fail(f"distill.pairs[{index}]", "weight must be >= 0 and temperature > 0")
        if self.distill is not None:
            self._validate_overrides(self.distill, fail)
        self._validate_unlabelled(fail)
        no_val = self.split.fixed is None and self.split.val_fraction == 0
        if self.train.patience is not None and no_val:
            fail("train.patience", "early stopping needs validation cases (val_fraction > 0)")
        if self.model.init_from is not None and not self.model.init_from.strip():
            fail("model.init_from", "must be a model or run folder (or null)")

    def _validate_ranges(self, fail: typing.Callable) -> None:
        """Every number of :data:`RANGES` in its range (NaN and infinity were refused when
        the values were read)."""
        data = self.to_dict()
        for key, (low, high, text) in RANGES.items():
            value = get_key(data, key)
            if value is None:
                continue
            if (low is not None and value < low) or (high is not None and value > high):
                fail(key, f"must be {text}, got {value!r}")
        if not 0 <= self.multitask.mask_ratio < 1:
            fail("multitask.mask_ratio", f"must be in [0, 1), got {self.multitask.mask_ratio!r}")
        if not 0 <= self.train.optimizer.momentum < 1:
            fail(
                "train.optimizer.momentum",
                f"must be in [0, 1), got {self.train.optimizer.momentum!r}",
            )
        if self.train.optimizer.lr <= 0:
            fail("train.optimizer.lr", f"must be > 0, got {self.train.optimizer.lr!r}")
        output = self.distill.output if self.distill else None
        if output is not None and output.temperature <= 0:
            fail("distill.output.temperature", f"must be > 0, got {output.temperature!r}")
        anchor = self.distill.anchor if self.distill else None
        if anchor is not None and anchor.temperature <= 0:
            fail("distill.anchor.temperature", f"must be > 0, got {anchor.temperature!r}")
        if anchor is not None and not anchor.model.strip():
            fail("distill.anchor.model", "must be a model or run folder (the parent version)")

    def _validate_unlabelled(self, fail: typing.Callable) -> None:
        """``train_on`` and ``distill.unlabelled`` together: a run without labels is a
        distillation with terms and images to apply them to."""
        label_free = self.train_on == TRAIN_ON_NONE
        if label_free and self.kind != "distill":
            fail("train_on", "'none' (no labels, teacher targets only) needs kind: distill")
        if self.kind != "distill" or self.distill is None:
            return
        distill = self.distill
        if not distill.unlabelled.strip():
            fail("distill.unlabelled", "must be none, train, auto or a folder of CT images")
        if distill.unlabelled == UNLABELLED_TRAIN and self.train_on == "train":
            fail(
                "distill.unlabelled",
                "'train' adds the training patients whose labels train_on leaves out, and "
                "train_on: train leaves none out (use train_on: student_train or none)",
            )
        if not label_free:
            return
        if self.unlabelled_images() == UNLABELLED_NONE:
            fail(
                "train_on",
                "'none' trains on teacher targets only: set distill.unlabelled to train (the "
                "training patients, without their labels) or to a folder of CT images",
            )
        if distill.scale == 0:
            fail("distill.scale", "0 leaves a run without labels (train_on: none) no loss")
        losses = [distill.feature_loss] + [pair.loss for pair in distill.pairs]
        if "supcon" in losses:
            key = "distill.feature_loss" if distill.feature_loss == "supcon" else "distill.pairs"
            fail(key, "supcon (the supervised voxel contrast) needs labels; train_on is none")

    @staticmethod
    def _validate_overrides(distill: DistillConfig, fail: typing.Callable) -> None:
        """``feature_loss`` and ``scale_weights`` change a preset's pairs; their names are
        checked against the preset (and the networks) when the terms are resolved."""
        for key in ("feature_loss", "scale_weights"):
            if getattr(distill, key) is None:
                continue
            if distill.pairs:
                fail(
                    f"distill.{key}",
                    "applies to a preset's pairs; explicit distill.pairs carry their own "
                    "loss and weight",
                )
            if distill.preset is None:
                fail(f"distill.{key}", "applies to a preset's pairs; set distill.preset")
        if distill.feature_loss is not None and not distill.feature_loss:
            fail("distill.feature_loss", "must name a feature loss (infonce, mse, cosine, supcon)")
        for label, weight in (distill.scale_weights or {}).items():
            if (
                isinstance(weight, bool)
                or not isinstance(weight, (int, float))
                or not math.isfinite(weight)
                or weight < 0
            ):
                fail(
                    f"distill.scale_weights.{key_name(label)}",
                    f"must be a number >= 0, got {weight!r}",
                )
