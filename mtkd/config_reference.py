"""The configuration reference, generated from the code: ``mtkd config``.

:func:`annotated_defaults` writes every key of :class:`~mtkd.config.RunConfig` with the value
the dataclasses give it, as commented YAML; :func:`preset_differences` tables where a protocol
preset (e.g. the paper's ``thesis-2d-spleen``) departs from those defaults. README.md shows
both, and a test keeps them equal to what these functions produce, so the README cannot drift
from the code.

The comments below describe what a key means, never its value: values come from the
dataclasses, and choices from the ``Literal`` types and the registries (``{dotted.key}`` in a
comment is replaced by the choices of that ``Literal`` field, ``{PRESETS}`` etc. by a
registry's names).
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Any, Literal

from mtkd.config import (
    RECOMMENDED_PRESET,
    AnchorConfig,
    DistillConfig,
    OutputTermConfig,
    RunConfig,
    TapPairConfig,
)

COMMENT_COLUMN = 30  # comments start here, or two spaces after a longer line
# Nested sections written on one line (flow style) rather than key by key.
FLOW = {"data.augment", "model", "multitask", "train.optimizer"}
# Sections whose default is null, shown with the defaults they take once given.
SHOWN_WHEN_SET = {"distill": DistillConfig}
# Keys without a usable default: the run is refused until they are set.
REQUIRED = {"data.source": "REQUIRED", "distill.teacher": "REQUIRED for kind: distill"}

COMMENTS = {
    "kind": "{kind} (train: a teacher or a plain network)",
    "name": "the run folder is runs/<name> unless --run-dir is given",
    "data.source": "MSD folder | images/ + labels/ folders | one file | DICOM folder",
    "data.labels_json": "label names when the dataset has none (else dataset.json or values)",
    "data.structures": "subset of label names, renumbered 1..K in this order (null: all)",
    "data.dims": "{data.dims} (2-D axial slices or 3-D patches)",
    "data.spacing": "[x, y, z] mm; a value <= 0 keeps that axis; null keeps all",
    "data.hu_window": "clipped and scaled to 0..1",
    "data.crop_foreground": "crop to the body (voxels above the window's lower bound)",
    "data.slice_size": "2-D network input (in-plane resize)",
    "data.patch_size": "3-D network input (patches, sliding window)",
    "data.patches_per_volume": "label-balanced patches per volume and epoch (3-D)",
    "data.in_channels": "the CT channel repeated (the thesis networks take 3)",
    "data.output": "{data.output} (auto: sigmoid for one structure, else softmax)",
    "data.augment": "training samples only; flip_prob per axis (left-right flips are unsafe)",
    "split.val_fraction": "of the patients; validation never overlaps test",
    "split.student_fraction": "share of the training patients a student trains on",
    "split.fixed": "or {train: [...], val: [...], test: [...]} case ids",
    "model": "a registered network; init_from: fine-tune from a model or run folder",
    "multitask": "reconstruction: {multitask.reconstruction} (a multi-task teacher: masked); "
    "reconstruction_loss_on: {multitask.reconstruction_loss_on} (masked: MAE-style)",
    "train_on": "{train_on}: whose labels (student_train: the students' share; none: no labels)",
    "train.optimizer": "name: {train.optimizer.name}",
    "train.scheduler": "{train.scheduler}",
    "train.seg_loss": "{train.seg_loss}",
    "train.seg_weight": "weight of the segmentation loss in the total",
    "train.amp": "bf16 (fp16 + scaler where bf16 is missing) on CUDA; ignored on the CPU",
    "train.val_every": "validate every N epochs",
    "train.device": "auto | cpu | cuda | cuda:1",
    "train.drop_last": "InfoNCE needs at least 2 images per batch",
    "train.patience": "stop after N validations without a better Dice (null: off)",
    "distill": "null (no distillation) unless kind: distill; its keys then default to:",
    "distill.teacher": "run/model folder, checkpoint, MONAI bundle, TorchScript/ONNX, outputs",
    "distill.preset": "{PAIR_PRESETS}: fill pairs and output; {OUTPUT_PRESETS}: a baseline's "
    "output term alone, at its published settings; recommended (null without pairs or output): "
    "{RECOMMENDED_PRESET}, measured best",
    "distill.pairs": "explicit tap pairs, each {PAIR}",
    "distill.output": "output-level term {OUTPUT} (loss: {OUTPUT_LOSSES})",
    "distill.scale": "multiplies every distillation weight; 0 is the no-KD baseline",
    "distill.feature_loss": "with a preset: {FEATURE_LOSSES} instead of InfoNCE",
    "distill.scale_weights": "with a preset: {B-B: 0.4, E-E: 0} replaces weights by pair label",
    "distill.negatives": "{distill.negatives}: InfoNCE's negatives (other_subjects: none from "
    "the same patient)",
    "distill.unlabelled": "auto | none | train | a folder of CTs: images for teacher targets "
    "only (auto: train where train_on leaves patients unlabelled and a term weighs)",
    "distill.teacher_targets": "{distill.teacher_targets}: the teacher's logits on every batch, "
    "or computed once per training image (precomputed; auto: where the output term alone weighs)",
    "distill.anchor": "the parent version as a second teacher {ANCHOR}: KL per voxel on every "
    "sample (model: a model/run folder with the student's labels)",
}
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)\}")


def flow(value: Any) -> str:
    """``value`` as one line of YAML (flow style), as PyYAML writes and reads it back."""
    import yaml

    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    text = yaml.safe_dump([value], default_flow_style=True, sort_keys=False, width=math.inf)
    return text.strip()[1:-1]


def choices() -> dict[str, str]:
    """What a ``{NAME}`` placeholder of a comment stands for: the choices of every Literal
    field by dotted key, the registries' names, and example entries from the dataclasses."""
    from mtkd.distill.losses import FEATURE_LOSSES, OUTPUT_LOSSES
    from mtkd.distill.presets import OUTPUT_PRESETS, PAIR_PRESETS, PRESETS

    found = {
        "PRESETS": " | ".join(PRESETS),
        "RECOMMENDED_PRESET": RECOMMENDED_PRESET,
        "PAIR_PRESETS": " | ".join(PAIR_PRESETS),
        "OUTPUT_PRESETS": " | ".join(OUTPUT_PRESETS),
        "FEATURE_LOSSES": " | ".join(sorted(FEATURE_LOSSES)),
        "OUTPUT_LOSSES": " | ".join(sorted(OUTPUT_LOSSES)),
        "PAIR": flow(TapPairConfig()),
        "OUTPUT": flow(OutputTermConfig()),
        "ANCHOR": flow(AnchorConfig()),
    }

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for item in dataclasses.fields(cls):
            hint = hints[item.name]
            options = [a for a in typing.get_args(hint) if a is not type(None)]
            if typing.get_origin(hint) is Literal:
                found[prefix + item.name] = " | ".join(str(a) for a in typing.get_args(hint))
            elif dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{item.name}.")
            elif len(options) == 1 and dataclasses.is_dataclass(options[0]):
                walk(options[0], f"{prefix}{item.name}.")

    walk(RunConfig, "")
    return found


def _comment(key: str, names: dict[str, str]) -> str:
    text = _PLACEHOLDER.sub(lambda match: names[match.group(1)], COMMENTS.get(key, ""))
    if key in REQUIRED:
        text = f"{REQUIRED[key]}, no default: {text}"
    return text


def _line(indent: int, text: str, comment: str) -> str:
    text = " " * indent + text
    if not comment:
        return text
    return f"{text.ljust(COMMENT_COLUMN - 2)}  # {comment}"


def _section(config: Any, prefix: str, indent: int, names: dict[str, str]) -> list[str]:
    lines = []
    for item in dataclasses.fields(config):
        key, value = prefix + item.name, getattr(config, item.name)
        if value is None and key in SHOWN_WHEN_SET:
            value = SHOWN_WHEN_SET[key]()
        comment = _comment(key, names)
        if dataclasses.is_dataclass(value) and key not in FLOW:
            lines.append(_line(indent, f"{item.name}:", comment))
            lines += _section(value, f"{key}.", indent + 2, names)
        else:
            lines.append(_line(indent, f"{item.name}: {flow(value)}", comment))
    return lines


def annotated_defaults() -> str:
    """Every configuration key with its default, as commented YAML (the README's block)."""
    names = choices()
    unknown = sorted(set(COMMENTS) - set(names) - set(_all_keys(RunConfig(), "")))
    if unknown:  # a renamed or removed key must take its comment along
        raise KeyError(f"comments for keys the configuration does not have: {unknown}")
    return "\n".join(_section(RunConfig(), "", 0, names)) + "\n"


def _all_keys(config: Any, prefix: str) -> list[str]:
    """Every dotted key of a configuration object, sections shown when set included."""
    keys = []
    for item in dataclasses.fields(config):
        key, value = prefix + item.name, getattr(config, item.name)
        if value is None and key in SHOWN_WHEN_SET:
            value = SHOWN_WHEN_SET[key]()
        keys.append(key)
        if dataclasses.is_dataclass(value):
            keys += _all_keys(value, f"{key}.")
    return keys


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(_flat(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): data}


MISSING = object()


def _cell(value: Any) -> str:
    return "" if value is MISSING else f"`{flow(value)}`"


def preset_differences(name: str = "thesis-2d-spleen") -> str:
    """A Markdown table of the keys in which protocol ``name``'s stages differ from the
    defaults (no-KD twins left out: they equal their stage but for ``distill.scale: 0``)."""
    from mtkd.protocols import load_protocol

    protocol = load_protocol(name)
    stages = [stage for stage in protocol.stages if stage.baseline_of is None]
    defaults = RunConfig().to_dict()
    defaults["distill"] = dataclasses.asdict(DistillConfig())
    flat_defaults = _flat(defaults)
    flat_stages = []
    for stage in stages:
        flat = _flat(stage.config.to_dict())
        if stage.config.distill is None:  # no distill keys rather than a null section
            del flat["distill"]
        flat_stages.append(flat)
    keys = list(flat_defaults)
    keys += [key for flat in flat_stages for key in flat if key not in keys]

    def changed(key: str) -> bool:
        default = flat_defaults.get(key, MISSING)
        return any(key in flat and flat[key] != default for flat in flat_stages)

    keys = [key for key in dict.fromkeys(keys) if key != "name" and changed(key)]
    rows = [["key", "default", *(stage.name for stage in stages)]]
    rows.append(["---"] * len(rows[0]))
    for key in keys:
        cells = [flat_defaults.get(key, MISSING), *(flat.get(key, MISSING) for flat in flat_stages)]
        rows.append([f"`{key}`", *(_cell(cell) for cell in cells)])
    return "".join("| " + " | ".join(row) + " |\n" for row in rows)
