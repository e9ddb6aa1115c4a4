"""The sections of a run configuration (``data``, ``split``, ``model``, ``multitask``, ``train``,
``distill`` and their parts): typed dataclasses with their defaults, one per YAML mapping."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mtkd.config_paths import PATH_KEYWORDS
from mtkd.errors import MTKDError

# distill.unlabelled's words that are not folders (a folder called so is written ./train)
UNLABELLED_NONE, UNLABELLED_TRAIN, UNLABELLED_AUTO = PATH_KEYWORDS["distill.unlabelled"]
# The recipe a distillation gets when its ``distill`` section names no terms (no preset, pairs
# or output), and what ``preset: recommended`` stands for: the cell that won on validation in
# the KD evidence grid (BENCHMARKS.md, "KD evidence grid, S1"): Hinton's KD per voxel at T 1,
# weight 1, no feature terms, with teacher targets also on the training images without labels
# (``unlabelled: auto``, the default). The run's stored config names the preset it resolved to.
RECOMMENDED = "recommended"
RECOMMENDED_PRESET = "hinton_published"
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
class AnchorConfig:
    """The parent version as a second, output-level teacher (the annotate-then-distill loop's
    anchor): per-voxel KL (``pmd``) between its outputs and the student's on every training
    sample, so that fine-tuning on new cases keeps what the parent knew."""

    model: str = ""  # our model or run folder, with the student's labels and output
    weight: float = 1.0
    temperature: float = 1.0


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
    its authors' published settings (sources in :mod:`mtkd.distill.presets`). A section with no
    preset, pairs or output, or ``preset: recommended``, gets :data:`RECOMMENDED_PRESET`.
    """

    teacher: str = ""  # run/model folder, checkpoint, bundle, TorchScript/ONNX, stored outputs
    # thesis | all_scales | <method>_published | recommended (null: explicit pairs/output, or
    # the recommended recipe when neither is given)
    preset: str | None = None
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
    # none; train (the training patients that ``train_on`` leaves without labels); auto (train
    # when ``train_on`` leaves some out and a term weighs, else none); or a folder of CTs (any
    # dataset layout, or a folder of image files; labels there are ignored)
    unlabelled: str = UNLABELLED_AUTO
    # the teacher's logits: online (a teacher pass on every batch), precomputed (once per
    # training image, kept with the cached case; the output term alone, no feature pairs) or
    # auto (precomputed where the output term alone weighs); mtkd.engine.teacher_targets
    teacher_targets: Literal["online", "precomputed", "auto"] = "online"
    # the parent version as a second teacher, on the outputs (None: no anchor); apart from the
    # teacher's terms (``scale`` leaves it as it is)
    anchor: AnchorConfig | None = None

    def fill_recommended(self) -> None:
        """Name the recommended preset where the section names no terms or asks for it."""
        if self.preset == RECOMMENDED or (
            self.preset is None and not self.pairs and self.output is None
        ):
            self.preset = RECOMMENDED_PRESET
