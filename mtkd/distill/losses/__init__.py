"""Distillation losses, registered by name.

Feature losses take aligned maps ``(student, teacher, temperature)`` of shape (B, C, *spatial);
output losses take logits ``(student_logits, teacher_logits, temperature)``. All return a
float32 scalar. Configuration refers to them by the names in FEATURE_LOSSES / OUTPUT_LOSSES.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mtkd.distill.losses.cwd import cwd_loss
from mtkd.distill.losses.dist import dist_loss
from mtkd.distill.losses.feature import cosine_loss, mse_loss
from mtkd.distill.losses.infonce import infonce_loss
from mtkd.distill.losses.output import check_logits, pmd_loss
from mtkd.errors import MTKDError

LossFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]

_FEATURE: dict[str, LossFn] = {
    "infonce": infonce_loss,
    "mse": lambda student, teacher, _temperature: mse_loss(student, teacher),
    "cosine": lambda student, teacher, _temperature: cosine_loss(student, teacher),
}
_OUTPUT: dict[str, LossFn] = {"pmd": pmd_loss, "cwd": cwd_loss, "dist": dist_loss}

FEATURE_LOSSES = frozenset(_FEATURE)
OUTPUT_LOSSES = frozenset(_OUTPUT)


def _lookup(registry: dict[str, LossFn], name: str, kind: str) -> LossFn:
    try:
        return registry[name]
    except KeyError:
        valid = ", ".join(sorted(registry))
        raise MTKDError(f"unknown {kind} loss '{name}'; valid: {valid}") from None


def get_feature_loss(name: str) -> LossFn:
    """The feature loss called ``name``: ``fn(student, teacher, temperature) -> scalar``."""
    return _lookup(_FEATURE, name, "feature")


def get_output_loss(name: str) -> LossFn:
    """The output loss called ``name``: ``fn(student_logits, teacher_logits, temperature)``."""
    return _lookup(_OUTPUT, name, "output")


__all__ = [
    "FEATURE_LOSSES",
    "OUTPUT_LOSSES",
    "LossFn",
    "check_logits",
    "cosine_loss",
    "cwd_loss",
    "dist_loss",
    "get_feature_loss",
    "get_output_loss",
    "infonce_loss",
    "mse_loss",
    "pmd_loss",
]
