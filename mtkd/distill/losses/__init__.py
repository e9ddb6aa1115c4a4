"""Distillation losses, registered by name.

Feature losses take aligned maps ``(student, teacher, temperature)`` of shape (B, C, *spatial)
(InfoNCE also an optional ``subject`` (B,): see NEGATIVES);
output losses take logits ``(student_logits, teacher_logits, temperature)``. All return a
float32 scalar. Configuration refers to them by the names in FEATURE_LOSSES / OUTPUT_LOSSES.

The supervised feature losses (SUPERVISED_FEATURE_LOSSES: ``supcon``) also need the batch's
ground-truth labels and keep state (learnable heads, a memory): they are modules that the
Distiller builds per tap pair (:class:`~mtkd.distill.connectors.ContrastConnector`), not
functions of this registry.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mtkd.distill.losses.cwd import cwd_loss
from mtkd.distill.losses.dist import dist_loss
from mtkd.distill.losses.feature import cosine_loss, mse_loss
from mtkd.distill.losses.infonce import NEGATIVES, check_subject, infonce_loss
from mtkd.distill.losses.output import check_logits, pmd_loss
from mtkd.distill.losses.supcon import SupervisedVoxelContrast, resize_labels
from mtkd.errors import MTKDError

LossFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]

_FEATURE: dict[str, LossFn] = {
    "infonce": infonce_loss,
    "mse": lambda student, teacher, _temperature: mse_loss(student, teacher),
    "cosine": lambda student, teacher, _temperature: cosine_loss(student, teacher),
}
_OUTPUT: dict[str, LossFn] = {"pmd": pmd_loss, "cwd": cwd_loss, "dist": dist_loss}

SUPERVISED_FEATURE_LOSSES = frozenset({"supcon"})
FEATURE_LOSSES = frozenset(_FEATURE) | SUPERVISED_FEATURE_LOSSES
OUTPUT_LOSSES = frozenset(_OUTPUT)
# A tap pair's temperature when none is given: the paper's 0.4 for InfoNCE, 0.1 for the
# supervised voxel contrast (Khosla et al. 2020; Wang et al. 2021); mse/cosine ignore it.
DEFAULT_TEMPERATURES = {"infonce": 0.4, "supcon": 0.1}
FALLBACK_TEMPERATURE = 0.4


def default_temperature(loss: str) -> float:
    """The temperature a tap pair with feature loss ``loss`` uses when none is given."""
    return DEFAULT_TEMPERATURES.get(loss, FALLBACK_TEMPERATURE)


def _lookup(registry: dict[str, LossFn], name: str, kind: str) -> LossFn:
    try:
        return registry[name]
    except KeyError:
        valid = ", ".join(sorted(registry))
        raise MTKDError(f"unknown {kind} loss '{name}'; valid: {valid}") from None


def get_feature_loss(name: str) -> LossFn:
    """The feature loss called ``name``: ``fn(student, teacher, temperature) -> scalar``."""
    if name in SUPERVISED_FEATURE_LOSSES:
        raise MTKDError(
            f"feature loss '{name}' needs labels and learnable heads: it is built per tap pair "
            f"by the Distiller (ContrastConnector / SupervisedVoxelContrast), not called alone"
        )
    return _lookup(_FEATURE, name, "feature")


def get_output_loss(name: str) -> LossFn:
    """The output loss called ``name``: ``fn(student_logits, teacher_logits, temperature)``."""
    return _lookup(_OUTPUT, name, "output")


__all__ = [
    "DEFAULT_TEMPERATURES",
    "FEATURE_LOSSES",
    "NEGATIVES",
    "OUTPUT_LOSSES",
    "SUPERVISED_FEATURE_LOSSES",
    "LossFn",
    "SupervisedVoxelContrast",
    "check_logits",
    "check_subject",
    "cosine_loss",
    "cwd_loss",
    "default_temperature",
    "dist_loss",
    "get_feature_loss",
    "get_output_loss",
    "infonce_loss",
    "mse_loss",
    "pmd_loss",
    "resize_labels",
]
