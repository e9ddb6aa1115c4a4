"""A run's anchor to the parent version (``distill.anchor``), opened and checked against the
student.

The parent is a model or run folder of ours (its weights' SHA-256 checked, as for
``model.init_from``). Its output is compared voxel by voxel with the student's, so it must have
the student's structures (names, in order), output activation and dimensions, give logits of
the student's shape, and work at the student's spacing; a different HU window is only warned
about. Anything else is refused, naming the anchor's folder.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mtkd.config import RunConfig
from mtkd.data.labels import LabelTable
from mtkd.data.preprocess import Preprocessing
from mtkd.distill.anchor import ParentAnchor
from mtkd.engine.setup_teacher import rounded_spacing
from mtkd.errors import MTKDError
from mtkd.modelfiles.model_io import LoadedModel, load_model
from mtkd.models.taps import first_tensor

__all__ = ["open_anchor"]

_KEY = "distill.anchor"


def open_anchor(
    config: RunConfig,
    network: torch.nn.Module,
    labels: LabelTable,
    activation: str,
    prep: Preprocessing,
    device: torch.device,
    log: Callable[[str], None],
) -> ParentAnchor | None:
    """The parent as a second teacher of ``network`` (the student, on ``device``), checked
    against the run; None without ``distill.anchor``, outside a distillation, or at weight 0."""
    distill = config.distill
    anchor = distill.anchor if config.kind == "distill" and distill is not None else None
    if anchor is None or anchor.weight == 0:
        return None
    parent = load_model(anchor.model, device)
    _check_parent(parent, labels, activation, prep, log)
    _check_output(parent, network, prep, device)
    record: dict[str, Any] = {
        "path": str(parent.folder.resolve()),
        "name": parent.name,
        "weights_sha256": parent.metadata.get("weights_sha256"),
        "weight": anchor.weight,
        "temperature": anchor.temperature,
    }
    return ParentAnchor(
        parent.network,
        anchor.weight,
        anchor.temperature,
        in_channels=parent.prep.in_channels,
        record=record,
    )


def _check_parent(
    parent: LoadedModel,
    labels: LabelTable,
    activation: str,
    prep: Preprocessing,
    log: Callable[[str], None],
) -> None:
    """The parent's structures, activation, dimensions and spacing are the student's."""
    problems = []
    if list(parent.labels.names) != list(labels.names):
        problems.append(
            f"its structures {list(parent.labels.names)} are not this run's "
            f"{list(labels.names)} (names, in order)"
        )
    if parent.activation != activation:
        problems.append(f"its output is {parent.activation}, this run's {activation}")
    if parent.prep.dims != prep.dims:
        problems.append(f"it is {parent.prep.dims}-D, the student {prep.dims}-D")
    if rounded_spacing(parent.prep.spacing) != rounded_spacing(prep.spacing):
        problems.append(f"it works at spacing {parent.prep.spacing} mm, this run at {prep.spacing}")
    if problems:
        raise MTKDError(
            f"config key '{_KEY}.model': the anchor must be a parent version of this student: "
            + "; ".join(problems),
            parent.folder,
        )
    if tuple(parent.prep.hu_window) != tuple(prep.hu_window):
        log(
            f"warning: the anchor (distill.anchor) was trained with HU window "
            f"{list(parent.prep.hu_window)}, this run uses {list(prep.hu_window)}"
        )


def _check_output(
    parent: LoadedModel, network: torch.nn.Module, prep: Preprocessing, device: torch.device
) -> None:
    """The parent's logits have the student's shape for one example input."""
    size = prep.slice_size if prep.dims == 2 else prep.patch_size
    example = torch.zeros(1, prep.in_channels, *size, device=device)
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            ours = first_tensor(network(example))
            theirs = first_tensor(parent.network(example[:, :1].expand(
                1, parent.prep.in_channels, *size)))  # fmt: skip
    finally:
        network.train(was_training)
    shapes = [None if t is None else tuple(t.shape) for t in (theirs, ours)]
    if shapes[0] != shapes[1]:
        raise MTKDError(
            f"config key '{_KEY}.model': the anchor's output {shapes[0]} differs from the "
            f"student's {shapes[1]} for the same input; the anchor must be a parent version "
            "of this student",
            parent.folder,
        )
