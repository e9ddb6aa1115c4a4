"""The networks of a run: the student, its ``model.init_from`` weights, the teacher, the
distiller that joins them and the anchor to the parent version (``distill.anchor``).

The student is built first, so that its random initialisation does not depend on the
teacher. ``model.init_from`` starts a new run from a previous model's weights (same network and
labels); a resumed run takes them from its checkpoint instead. With every distillation weight
at zero there is no distiller (the no-KD baseline: the same recipe, no teacher pass). The anchor
opens last, so that the student, the teacher and the connectors start alike with and without.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtkd.config import DistillConfig, RunConfig
from mtkd.distill.anchor import ParentAnchor
from mtkd.distill.distiller import Distiller
from mtkd.distill.presets import resolve_output_term, resolve_terms
from mtkd.engine.setup_anchor import open_anchor
from mtkd.engine.setup_data import RunData
from mtkd.engine.setup_teacher import open_teacher, rounded_spacing
from mtkd.engine.step import IGNORE_LABEL
from mtkd.engine.teacher_source import TeacherSource, teacher_transform
from mtkd.engine.teacher_targets import precompute_teacher_logits
from mtkd.errors import MTKDError
from mtkd.modelfiles.model_io import FORMAT_VERSION, build_from_spec, load_model
from mtkd.models import count_parameters, network_info

__all__ = ["RunModels", "build_run_models", "model_metadata", "run_lineage"]


@dataclass
class RunModels:
    """What the training loop uses of a run's networks."""

    spec: dict[str, Any]  # the student's network spec (name, params, reconstruction)
    network: torch.nn.Module  # the student, on the run's device
    source: TeacherSource | None  # the teacher (a network or stored outputs); None to train
    distiller: Distiller | None  # student, teacher and connectors; None without distillation
    previous: dict[str, Any] | None  # the lineage record of model.init_from (new runs only)
    anchor: ParentAnchor | None = None  # the parent version as a second teacher (distill.anchor)
    teacher_maps: str = "probabilities"  # what batches' "teacher" holds: or "logits" (precomputed)


def build_run_models(
    config: RunConfig,
    data: RunData,
    *,
    resume: bool,
    device: torch.device,
    log: Callable[[str], None],
) -> RunModels:
    """Build the student (with the init_from weights of a new run), open a teacher network
    (stored outputs come opened in ``data``) and the distiller when a term weighs."""
    spec = _network_spec(config, data)
    network = build_from_spec(spec).to(device)
    previous = None
    if config.model.init_from and not resume:
        previous = _init_from(config.model.init_from, network, spec, data, log)
    source = data.source
    if source is None:
        source = open_teacher(config, data.labels, data.activation, data.prep, device, log)
    if data.cache.teacher_logits:  # distill.teacher_targets: precomputed
        case_ids = data.train_ids + data.unlabelled_ids
        precompute_teacher_logits(
            source, data.cache, case_ids, data.prep, data.labels, data.activation, device, log
        )
    distiller = None
    if source is not None and config.distill is not None:
        distiller = _distiller(config.distill, source, spec, network, data, device)
    anchor = open_anchor(config, network, data.labels, data.activation, data.prep, device, log)
    return RunModels(
        spec=spec,
        network=network,
        source=source,
        distiller=distiller,
        previous=previous,
        anchor=anchor,
        teacher_maps="logits" if data.cache.teacher_logits else "probabilities",
    )


def run_lineage(
    config: RunConfig, run_root: Path, models: RunModels, previous: dict[str, Any] | None
) -> dict[str, Any]:
    """Where the model comes from: the run, its teacher, its ``model.init_from`` model
    (``previous``, with the validation Dice of its weights on this run) and its anchor."""
    lineage: dict[str, Any] = {
        "kind": config.kind,
        "run": str(run_root.resolve()),
        "distilled": models.distiller is not None,  # False for the no-KD baseline
    }
    if models.source is not None:
        lineage["teacher"] = models.source.lineage()
    if previous is not None:
        lineage["previous"] = dict(previous)
    if models.anchor is not None:
        lineage["anchor"] = dict(models.anchor.record)
    return lineage


def model_metadata(
    config: RunConfig, data: RunData, models: RunModels, lineage: dict[str, Any]
) -> dict[str, Any]:
    """What ``export_model`` writes to ``mtkd_model.json`` (less the weights' SHA-256 and
    creation time), so that a checkpoint can be opened as a model."""
    return {
        "format_version": FORMAT_VERSION,
        "name": config.name,
        "network": models.spec,
        "parameters": count_parameters(models.network),
        "labels": data.labels.to_dict(),
        "activation": data.activation,
        "preprocessing": data.prep.to_dict(),
        "lineage": lineage,
        "metrics": {},
    }


def _network_spec(config: RunConfig, data: RunData) -> dict[str, Any]:
    """The student's spec: the configured network with the data's channels and dims, and
    the multi-task reconstruction of a teacher run."""
    params = dict(config.model.params)
    params.update(
        in_channels=data.prep.in_channels,
        out_channels=1 if data.activation == "sigmoid" else len(data.labels) + 1,
        spatial_dims=data.prep.dims,
    )
    reconstruction = config.multitask.reconstruction if config.kind == "train" else "none"
    spec = {"name": config.model.name, "params": params, "reconstruction": reconstruction}
    if reconstruction != "none":
        spec["mask_ratio"] = config.multitask.mask_ratio
        spec["mask_patch"] = config.multitask.mask_patch
    return spec


def _init_from(
    path: str,
    network: torch.nn.Module,
    spec: dict[str, Any],
    data: RunData,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Load the weights of the previous model at ``path`` into ``network``; its network
    (name, params) and labels must be this run's. Returns its lineage record."""
    previous = load_model(path)  # SHA-256 checked, weights_only
    differences = _network_differences(previous.metadata.get("network", {}), spec)
    if differences:
        raise MTKDError(
            "model.init_from: the previous model's network differs from this run's "
            f"({'; '.join(differences)}; previous vs this run)",
            previous.folder,
        )
    if list(previous.labels.names) != list(data.labels.names):
        raise MTKDError(
            "model.init_from: the previous model's labels differ from this run's "
            f"(previous {list(previous.labels.names)}, this run {list(data.labels.names)})",
            previous.folder,
        )
    try:
        network.load_state_dict(previous.network.state_dict())
    except RuntimeError as error:
        raise MTKDError(
            f"model.init_from: weights do not fit this run's network ({error})",
            previous.folder,
        ) from None
    for what, a, b in (
        ("HU window", list(previous.prep.hu_window), list(data.prep.hu_window)),
        ("spacing", rounded_spacing(previous.prep.spacing), rounded_spacing(data.prep.spacing)),
    ):
        if a != b:
            log(
                f"warning: the previous model (model.init_from) was trained with {what} "
                f"{a}, this run uses {b}"
            )
    return {
        "path": str(previous.folder.resolve()),
        "name": previous.name,
        "weights_sha256": previous.metadata.get("weights_sha256"),
        "val_dice_on_this_run": None,
    }


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


def _distiller(
    distill: DistillConfig,
    source: TeacherSource,
    spec: dict[str, Any],
    network: torch.nn.Module,
    data: RunData,
    device: torch.device,
) -> Distiller | None:
    """The student, the teacher and the connectors of the weighted terms, on ``device``;
    None when every weight is zero (the no-KD baseline)."""
    if source.has_taps:
        pairs, output = _terms(distill, source, spec)
    else:
        pairs, output = [], resolve_output_term(distill)
    weights = [pair.weight for pair in pairs] + ([output.weight] if output else [])
    if not any(weight > 0 for weight in weights):
        return None
    size = data.prep.slice_size if data.prep.dims == 2 else data.prep.patch_size
    example = torch.zeros(2, data.prep.in_channels, *size, device=device)  # (N, C, *spatial)
    if source.model is None or data.cache.teacher_logits:  # the batches carry the teacher's maps
        distiller = Distiller(network, None, [], output, example, ignore_index=IGNORE_LABEL)
        return distiller.to(device)
    distiller = Distiller(
        network,
        source.model.network,
        pairs,
        output,
        example,
        teacher_transform=teacher_transform(source.model, data.labels, data.activation),
        teacher_in_channels=source.model.prep.in_channels,
        ignore_index=IGNORE_LABEL,  # the labels of unlabelled samples (supcon)
    )
    return distiller.to(device)


def _terms(distill: DistillConfig, source: TeacherSource, spec: dict[str, Any]):
    """Tap pairs and output term for a teacher network with taps."""
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
