"""Typed, validated run configuration, read from and written to YAML.

One :class:`RunConfig` drives a run (teacher training, plain student training or
distillation) from the command line, from Slicer, and in the run folder's ``config.yaml``.
Unknown keys, wrong types, unknown names, NaN or infinite numbers, values out of range, an
unknown ``train.device`` and files that are not YAML text are errors that name the key and the
file.
A relative path in a configuration file is read from the file's folder (see
:mod:`mtkd.config_paths`). PyYAML is imported when a file is read or written, so that Slicer
can import this module before the engine's dependencies are installed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mtkd.config_paths import (
    ABSOLUTE_PATHS,
    ABSOLUTE_PATHS_COMMENT,
    PATH_KEYS,
    PATH_KEYWORDS,
    PathOrigin,
    fallback_section,
    get_key,
    is_path_value,
    missing_path_message,
    relative_paths,
    resolve_paths,
)
from mtkd.devices import check_device_name
from mtkd.errors import MTKDError, one_line

# distill.unlabelled's words that are not folders (a folder called so is written ./train)
UNLABELLED_NONE, UNLABELLED_TRAIN = PATH_KEYWORDS["distill.unlabelled"]
# train_on: which training patients' labels a run uses; "none": no labels (teacher targets only)
TRAIN_ON_NONE = "none"


@dataclass
class AugmentConfig:
    """Random augmentations applied to training samples only."""

    flip_prob: float = (
        0.0  # per spatial axis: left-right flips are anatomically unsafe, off by default
    )
    rotate90_prob: float = 0.0
    intensity_scale: float = 0.1  # RandScaleIntensity factor range +-
    intensity_shift: float = 0.05  # RandShiftIntensity offset range +- (on the 0..1 window)
    noise_std: float = 0.01  # RandGaussianNoise std (0 disables)
    prob: float = 0.5  # probability of each intensity augmentation


@dataclass
class DataConfig:
    """Where the cases come from and how a CT becomes network input."""

    source: str = ""  # MSD folder, folder pairs (images/, labels/), single file or DICOM folder
    labels_json: str | None = None  # label names when the dataset has none
    structures: list[str] | None = None  # subset of label names, renumbered 1..K in this order
    dims: Literal[2, 3] = 2  # 2: axial slices, 3: patches
    spacing: list[float] | None = (
        None  # target spacing (mm) x, y, z; <= 0 keeps an axis; None keeps
    )
    hu_window: list[float] = field(default_factory=lambda: [-200.0, 300.0])
    crop_foreground: bool = True  # crop to the body (voxels above the window's lower bound)
    slice_size: list[int] = field(default_factory=lambda: [128, 128])  # 2-D network input (x, y)
    patch_size: list[int] = field(default_factory=lambda: [64, 64, 64])  # 3-D network input
    patches_per_volume: int = 4  # label-balanced 3-D patches drawn per volume and epoch
    in_channels: int = 1  # CT channel repeated to this many (the thesis networks take 3)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    output: Literal["auto", "softmax", "sigmoid"] = "auto"  # auto: sigmoid for one structure


@dataclass
class SplitConfig:
    """Patient-level split; ``fixed`` lists case ids explicitly instead."""

    seed: int = 0
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    student_fraction: float = 1.0  # share of the training patients a student sees (paper: 0.5)
    fixed: dict[str, list[str]] | None = None


@dataclass
class NetworkConfig:
    """A registered network by name, with its size parameters."""

    name: str = "thesis_s1"
    params: dict[str, Any] = field(default_factory=dict)
    # Fine-tune: a model or run folder of ours whose weights start a NEW run (a resumed run
    # continues from its checkpoint). Its network (name, params) and labels (names, in order)
    # must equal this run's; it is validated once before the first epoch (initial_val_dice).
    init_from: str | None = None


@dataclass
class MultiTaskConfig:
    """The teacher's extra task: reconstruction of the (masked) input."""

    reconstruction: Literal["masked", "unmasked", "none"] = "masked"
    weight: float = 0.2  # weight of the MSE reconstruction loss
    mask_ratio: float = 0.5
    mask_patch: int = 8
    # where the reconstruction MSE is taken: the whole image, or only the masked patches (as
    # in MAE, He et al. 2022; needs reconstruction: masked)
    reconstruction_loss_on: Literal["all", "masked"] = "all"

    def __post_init__(self) -> None:
        if self.reconstruction_loss_on == "masked" and self.reconstruction == "unmasked":
            raise MTKDError(
                "config key 'multitask.reconstruction_loss_on': 'masked' needs masked patches "
                "(multitask.reconstruction: masked), not reconstruction: unmasked"
            )


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "adam", "sgd", "rmsprop"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9


@dataclass
class TrainConfig:
    """The recipe, identical for a no-KD student and its distilled twin."""

    epochs: int = 20
    batch_size: int = 8
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: Literal["none", "cosine", "poly"] = "cosine"
    seg_loss: Literal["dice_ce", "dice", "ce"] = "dice_ce"
    seg_weight: float = 1.0
    amp: bool = True  # mixed precision on CUDA (ignored on the CPU)
    grad_accum: int = 1
    val_every: int = 1
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:1
    num_workers: int = 0
    drop_last: bool = True  # InfoNCE needs >= 2 images per batch
    # early stopping: validation checks without a better validation Dice before the run ends
    # (its best model exported); None: off, the run trains all ``epochs``
    patience: int | None = None


@dataclass
class TapPairConfig:
    """One student <- teacher feature pair (names as printed by ``mtkd taps``)."""

    student: str = ""
    teacher: str = ""
    loss: str = "infonce"  # infonce, mse, cosine, supcon (supervised voxel contrast)
    weight: float = 0.1
    temperature: float | None = None  # None: the loss's default (infonce 0.4, supcon 0.1)
    name: str | None = None


@dataclass
class OutputTermConfig:
    """Output-level distillation term."""

    loss: str = "pmd"
    weight: float = 0.2
    temperature: float = 4.0


@dataclass
class DistillConfig:
    """Teacher and terms. A preset fills the tap pairs and the output term:

    - ``thesis``: the paper's E-E (encoder level 2), B-B and D-D pairs, weights 0.1/0.2/0.1;
    - ``all_scales``: every encoder level both networks have (E1-E1 .. En-En, matched from the
      shallowest; 0.1 each) plus B-B (0.2) and D-D (0.1).

    Both use InfoNCE (tau 0.4), and PMD (T 4, weight 0.2) unless ``output`` is given.
    ``feature_loss`` and ``scale_weights`` change a preset's pairs (not explicit ``pairs``); with
    ``feature_loss: supcon`` (supervised voxel contrast) the pairs' temperature is 0.1.
    ``cwd_published``, ``dist_published`` and ``hinton_published`` are an output term alone at
    its authors' published settings (sources in :mod:`mtkd.distill.presets`).
    """

    teacher: str = ""  # run/model folder, checkpoint, bundle, TorchScript/ONNX, stored outputs
    preset: str | None = None  # thesis | all_scales | <method>_published (null: explicit)
    pairs: list[TapPairConfig] = field(default_factory=list)
    output: OutputTermConfig | None = None
    scale: float = 1.0  # multiplies every distillation weight; 0 is the no-KD baseline
    # replaces the preset's InfoNCE: infonce, mse, cosine, supcon
    feature_loss: str | None = None
    # weight per pair label (thesis: E-E, B-B, D-D; all_scales: E1-E1 .. En-En, B-B, D-D),
    # replacing the preset's before ``scale``; 0 drops the pair
    scale_weights: dict[str, float] | None = None
    # InfoNCE's negatives: the other images of the batch (the paper), or only the images of
    # other subjects (patients), so that neighbouring slices of one patient are not pushed apart
    negatives: Literal["batch", "other_subjects"] = "batch"
    # images the distillation terms also see, without labels (no segmentation loss on them):
    # none; train (the training patients that ``train_on`` leaves without labels); or a folder
    # of CTs (any dataset layout, or a folder of image files; labels there are ignored)
    unlabelled: str = UNLABELLED_NONE


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
        config = _build(cls, data, "", source)
        config.validate(source)
        return config

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
            fail("distill.unlabelled", "must be none, train or a folder of CT images")
        if distill.unlabelled == UNLABELLED_TRAIN and self.train_on == "train":
            fail(
                "distill.unlabelled",
                "'train' adds the training patients whose labels train_on leaves out, and "
                "train_on: train leaves none out (use train_on: student_train or none)",
            )
        if not label_free:
            return
        if distill.unlabelled == UNLABELLED_NONE:
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
                    f"distill.scale_weights.{_name(label)}",
                    f"must be a number >= 0, got {weight!r}",
                )


MAX_CONFIG_BYTES = 16 * 2**20


def read_yaml(path: str | Path) -> Any:
    """The content of a YAML configuration file (``{}`` when empty); MTKDError naming the file
    when it is missing or not valid YAML."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise MTKDError("is a folder, not a configuration file (YAML)", path=path)
    if not path.is_file():
        raise MTKDError("configuration file not found", path=path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise MTKDError(
                f"too large for a configuration file (over {MAX_CONFIG_BYTES // 2**20} MiB)", path
            )
        text = path.read_bytes().decode("utf-8")
        data = yaml.safe_load(text)
        _check_expanded_size(data, path)
    except OSError as error:
        raise MTKDError(f"cannot read ({error.strerror or error})", path=path) from None
    except UnicodeDecodeError:
        raise MTKDError(
            "not a configuration file: binary content, not UTF-8 text", path=path
        ) from None
    except yaml.YAMLError as error:
        raise MTKDError(f"not valid YAML ({one_line(error)})", path=path) from None
    except RecursionError:
        raise MTKDError("not a configuration: nested too deeply", path=path) from None
    return {} if data is None else data


MAX_CONFIG_VALUES = 100_000


def _check_expanded_size(data: Any, path: Path) -> None:
    """MTKDError when YAML aliases (``&a`` ... ``*a``) make ``data`` refer to itself, or
    expand it past MAX_CONFIG_VALUES values (a few lines can stand for billions)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) in open_nodes:
            raise MTKDError("a YAML alias refers to a value that contains it (a loop)", path)
        if id(node) not in sizes:
            open_nodes.add(id(node))
            children = node.values() if isinstance(node, dict) else node
            sizes[id(node)] = 1 + sum(size(child) for child in children)
            open_nodes.discard(id(node))
        return sizes[id(node)]

    if size(data) > MAX_CONFIG_VALUES:
        raise MTKDError(
            f"too many values for a configuration (over {MAX_CONFIG_VALUES:,} once YAML "
            "aliases are expanded)",
            path,
        )


def differing_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys (``train.epochs``) in which two nested mappings differ, sorted."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in sorted(set(a) | set(b), key=str):
            found += differing_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        return found
    return [] if a == b else [prefix.rstrip(".")]


def load_config(path: str | Path) -> RunConfig:
    """Read a YAML run configuration; errors name the file and the key.

    Paths come back absolute: a relative one is read from the file's folder, else (when it
    does not exist there) from the file's ``absolute_paths`` section, as a run writes it."""
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise MTKDError("a configuration must be a mapping of keys to values", path=path)
    data, origin = resolve_file_paths(data, path)
    config = RunConfig.from_dict(data, source=path)
    config.origin = origin
    return config


def resolve_file_paths(data: dict[str, Any], path: str | Path) -> tuple[dict, PathOrigin]:
    """The configuration ``data`` read from file ``path`` with its paths absolute (its
    ``absolute_paths`` section taken out), and where they were read from."""
    data = dict(data)
    fallback = fallback_section(data.pop(ABSOLUTE_PATHS, None), path)
    data, tried = resolve_paths(data, Path(path).absolute().parent, fallback, source=path)
    return data, PathOrigin(Path(path), tried)


def dump_config(config: RunConfig, folder: str | Path | None = None) -> str:
    """The configuration as YAML text (keys in declaration order). Written into ``folder``
    (a run folder), its paths are relative to that folder, with their absolute form in an
    ``absolute_paths`` section; without ``folder`` they are written as they are."""
    import yaml

    data = config.to_dict()
    if folder is None:
        return yaml.safe_dump(data, sort_keys=False)
    data, section = relative_paths(data, folder)
    text = yaml.safe_dump(data, sort_keys=False)
    if section:
        text += ABSOLUTE_PATHS_COMMENT + yaml.safe_dump({ABSOLUTE_PATHS: section}, sort_keys=False)
    return text


def _build(cls: type, data: Any, prefix: str, source: str | Path | None) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, checking keys and types recursively."""
    if not isinstance(data, dict):
        raise MTKDError(f"config key '{prefix.rstrip('.') or '<root>'}' must be a mapping", source)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    where = f" in '{prefix.rstrip('.')}'" if prefix else ""
    _check_names(data, where, source)
    unknown = sorted(set(data) - known)
    if unknown:
        raise MTKDError(
            f"unknown config key(s) {', '.join(map(_name, unknown))}{where}; known: "
            f"{', '.join(sorted(known))}",
            path=source,
        )
    values = {
        name: _coerce(hints[name], value, f"{prefix}{name}", source) for name, value in data.items()
    }
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str, source: str | Path | None) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        return _coerce(options[0], value, key, source)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.", source)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise MTKDError(f"config key '{key}' is {value!r}; choose one of {choices}", source)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise MTKDError(f"config key '{key}' must be a list", path=source)
        return [_coerce(args[0], item, f"{key}[{i}]", source) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise MTKDError(f"config key '{key}' must be a mapping", path=source)
        _check_names(value, f" in '{key}'", source)
        return {
            name: _coerce(args[1], item, f"{key}.{_name(name)}", source)
            for name, item in value.items()
        }
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise MTKDError(f"config key '{key}' must be a finite number, got {value!r}", source)
        return number
    if hint is Any:
        _check_finite(value, key, source)
        return value
    if isinstance(hint, type) and isinstance(value, hint):
        if hint is int and isinstance(value, bool):
            raise MTKDError(f"config key '{key}' must be an integer", path=source)
        return value
    name = getattr(hint, "__name__", str(hint))
    raise MTKDError(f"config key '{key}' must be {name}, got {_shown(value)}", path=source)


def _check_finite(value: Any, key: str, source: str | Path | None) -> None:
    """MTKDError naming the key of a NaN or infinity anywhere in a free-form value (network
    parameters): no setting of ours takes one."""
    if isinstance(value, float) and not math.isfinite(value):
        raise MTKDError(f"config key '{key}' must be a finite number, got {value!r}", source)
    if isinstance(value, dict):
        for name, item in value.items():
            _check_finite(item, f"{key}.{_name(name)}", source)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_finite(item, f"{key}[{index}]", source)


def _check_names(data: dict, where: str, source: str | Path | None) -> None:
    """MTKDError when a key of the mapping ``data`` is not text (YAML allows ``1:``, ``[a]:``)."""
    for name in data:
        if not isinstance(name, str):
            raise MTKDError(f"config key {_shown(name)}{where} must be a name (text)", source)


def _name(name: Any) -> str:
    """A key for messages: as written when it is plain text, else quoted with escapes."""
    plain = isinstance(name, str) and name.isprintable() and name.strip() == name
    plain = plain and 0 < len(name) <= 60
    return name if plain else _shown(name, 60)


def _shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for one-line messages."""
    text = one_line(repr(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."
