"""The MTKDTrain panel's choices as a run configuration, and the commands that run it (no Qt).

The data preprocessing (2-D or 3-D, slice or patch size, spacing, HU window, input channels)
is the teacher's, read from its model metadata, so the student sees what the teacher saw; the
student's network, the distillation terms and the recipe are the user's. The result is checked
by the engine's own configuration reader (:class:`mtkd.config.RunConfig`) before it is written.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtkd.config import RunConfig, dump_config
from mtkd.data.atomic import atomic_write_bytes
from mtkd.modelfiles.files import METADATA, model_folder
from mtkd.run_folder import RunDir
from MTKDLib.devices import check_device

# student size presets: shown text -> registered network name
STUDENT_PRESETS = {
    "S1: thesis student, about 57 k parameters": "thesis_s1",
    "S2: thesis student, larger": "thesis_s2",
}
# tap-pair presets: shown text -> engine preset (None: the user's own pairs, "none": no pairs)
TAP_PRESETS = {
    "The paper's E-E, B-B, D-D": "thesis",
    "All scales (every encoder level, B-B, D-D)": "all_scales",
    "Custom pairs": None,
    "No feature terms (output only; recommended)": "none",
}
FEATURE_LOSSES = ("infonce", "mse", "cosine", "supcon")
OUTPUT_LOSSES = ("pmd", "cwd", "dist", "none")


@dataclass
class TrainingOptions:
    """Everything the configuration panel sets."""

    dataset: str  # a dataset folder the engine reads (MSD, folder pairs, ...)
    teacher: str  # our run or model folder (its preprocessing is used)
    name: str = "student"
    student: str = "thesis_s1"
    # the defaults are the recommended recipe (mtkd.config.RECOMMENDED_PRESET, chosen on
    # validation in BENCHMARKS.md): no feature terms, Hinton's KD per voxel (pmd) at T 1 and
    # weight 1, teacher targets also on the training cases without labels
    taps: str | None = "none"  # see TAP_PRESETS
    custom_pairs: list[tuple[str, str]] = field(default_factory=list)  # (student, teacher) taps
    feature_loss: str = "infonce"
    scale_weights: dict[str, float] | None = None  # per pair label, e.g. {"B-B": 0.3}
    output_loss: str = "pmd"
    output_weight: float = 1.0
    output_temperature: float = 1.0
    use_unlabelled: bool = True  # distill.unlabelled auto (True) or none
    # distill.teacher_targets auto (True: the teacher's logits computed once per training image
    # where the output term alone weighs) or online (the engine's default, on every batch)
    precompute_teacher: bool = False
    epochs: int = 20
    batch_size: int = 8
    learning_rate: float = 1e-3
    student_fraction: float = 0.5
    device: str = "auto"
    seed: int = 0
    init_from: str | None = None  # fine-tune from this model (the annotate-then-distill loop)
    patience: int | None = None  # early stopping: validation checks without a better Dice
    # the parent version as a second teacher (distill.anchor; the loop's fine-tuning recipe)
    anchor: str | None = None
    anchor_weight: float = 1.0
    anchor_temperature: float = 1.0
    # explicit case lists (train, val, test, student_train): the loop's pinned split
    split: dict[str, list[str]] | None = None


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """Custom tap pairs typed one per line as ``student_tap teacher_tap`` (``#`` comments)."""
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.replace(",", " ").split()
        if len(parts) != 2:
            raise ValueError(f"custom pairs, line {number}: write 'student_tap teacher_tap'")
        pairs.append((parts[0], parts[1]))
    return pairs


def teacher_metadata(teacher: str | Path) -> dict[str, Any]:
    """The model metadata of our run or model folder (read as JSON; no torch needed)."""
    path = Path(teacher)
    candidate = model_folder(path) / METADATA
    if candidate.is_file():
        return json.loads(candidate.read_text())
    raise ValueError(
        f"{path}: not an MTKD run or model folder ({METADATA} not found); the teacher's "
        "preprocessing is read from it"
    )


def _data_section(options: TrainingOptions, metadata: dict[str, Any]) -> dict[str, Any]:
    prep = metadata["preprocessing"]
    labels = metadata["labels"]
    structures = [labels[key] for key in sorted(labels, key=int)]
    data = {
        "source": str(options.dataset),
        "structures": structures,
        "dims": prep["dims"],
        "hu_window": prep["hu_window"],
        "spacing": prep["spacing"],
        "crop_foreground": prep["crop_foreground"],
        "slice_size": prep["slice_size"],
        "patch_size": prep["patch_size"],
        "in_channels": prep["in_channels"],
    }
    return data


def _distill_section(options: TrainingOptions) -> dict[str, Any]:
    distill: dict[str, Any] = {"teacher": str(options.teacher)}
    if options.taps is None:
        if not options.custom_pairs:
            raise ValueError("custom tap pairs: give at least one (student tap, teacher tap)")
        distill["pairs"] = [
            {"student": s, "teacher": t, "loss": options.feature_loss, "name": f"pair{i}"}
            for i, (s, t) in enumerate(options.custom_pairs)
        ]
    elif options.taps != "none":
        distill["preset"] = options.taps
        if options.feature_loss != "infonce":
            distill["feature_loss"] = options.feature_loss
        if options.scale_weights:
            distill["scale_weights"] = dict(options.scale_weights)
    if options.output_loss not in OUTPUT_LOSSES:
        raise ValueError(f"output loss must be one of {', '.join(OUTPUT_LOSSES)}")
    if options.output_loss != "none":
        distill["output"] = {
            "loss": options.output_loss,
            "weight": options.output_weight,
            "temperature": options.output_temperature,
        }
    elif options.taps == "none":
        raise ValueError("choose feature terms or an output loss (or both) to distill")
    distill["unlabelled"] = "auto" if options.use_unlabelled else "none"
    distill["teacher_targets"] = "auto" if options.precompute_teacher else "online"
    if options.anchor:
        distill["anchor"] = {
            "model": str(options.anchor),
            "weight": options.anchor_weight,
            "temperature": options.anchor_temperature,
        }
    return distill


def _split_section(options: TrainingOptions) -> dict[str, Any]:
    split: dict[str, Any] = {"seed": options.seed, "student_fraction": options.student_fraction}
    if options.split is not None:
        split["fixed"] = {part: list(cases) for part, cases in options.split.items()}
    return split


def build_config(options: TrainingOptions) -> dict[str, Any]:
    """The run configuration (a dict ready for ``config.yaml``), checked by the engine."""
    check_device(options.device)
    if not 0 < options.student_fraction <= 1:
        raise ValueError("the student's share of the labelled cases must be in (0, 1]")
    metadata = teacher_metadata(options.teacher)
    model: dict[str, Any] = {"name": options.student}
    if options.init_from:
        model["init_from"] = str(options.init_from)
    config = {
        "kind": "distill",
        "name": options.name,
        "data": _data_section(options, metadata),
        "split": _split_section(options),
        "model": model,
        "train_on": "student_train",
        "train": {
            "epochs": options.epochs,
            "batch_size": options.batch_size,
            "optimizer": {"name": "adamw", "lr": options.learning_rate},
            "device": options.device,
            "seed": options.seed,
            "patience": options.patience,
        },
        "distill": _distill_section(options),
    }
    try:
        RunConfig.from_dict(config)
    except Exception as error:  # MTKDError naming the key
        raise ValueError(f"the configuration is not valid: {error}") from None
    return config


def write_config(options: TrainingOptions, run_dir: str | Path) -> Path:
    """Write ``RUN/config.yaml`` for a new run (refused where a run already is)."""
    run_dir = Path(run_dir)
    if RunDir(run_dir).last_checkpoint.exists() or RunDir(run_dir).model.exists():
        raise ValueError(f"{run_dir}: a run is already there; resume it or choose another folder")
    config = RunConfig.from_dict(build_config(options))
    run_dir.mkdir(parents=True, exist_ok=True)
    path = RunDir(run_dir).config
    # as a run writes it: paths relative to the run folder, their absolute form beside them
    atomic_write_bytes(path, dump_config(config, folder=run_dir).encode())
    return path


def distill_arguments(run_dir: str | Path, resume: bool = False) -> list[str]:
    """Arguments of ``mtkd`` that start (or resume) the run in ``run_dir``."""
    run_dir = Path(run_dir)
    if resume:
        return ["distill", "--resume", str(run_dir)]
    return ["distill", str(RunDir(run_dir).config), "--run-dir", str(run_dir)]


def server_commands(run_dir: str | Path) -> str:
    """How to run the same configuration on a GPU server (shown in the panel)."""
    run_dir = Path(run_dir)
    config = shlex.quote(str(RunDir(run_dir).config))
    run = shlex.quote(str(run_dir))
    lines = [
        "# On a GPU server with the same engine (pip install mtkd from this extension's version),",
        "# the dataset and teacher where config.yaml finds them: relative to the run folder",
        "# (copy them together with it) or at their absolute paths (edit them if neither fits):",
        f"mtkd distill {config} --run-dir {run} --device cuda",
        "# stopped or interrupted? continue it:",
        f"mtkd distill --resume {run}",
        "# several GPUs on one machine (N = number of GPUs; train.batch_size is per GPU):",
        f"torchrun --standalone --nproc_per_node N -m mtkd distill {config} --run-dir {run}",
        f"torchrun --standalone --nproc_per_node N -m mtkd distill --resume {run}",
        "# follow it from Slicer: MTKDTrain > Attach, with the run folder on a shared path",
    ]
    return "\n".join(lines) + "\n"
