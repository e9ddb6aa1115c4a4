"""Plain feature-matching losses between aligned student and teacher maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtkd.errors import MTKDError


def _check_same_shape(student: torch.Tensor, teacher: torch.Tensor, loss: str) -> None:
    if student.shape != teacher.shape:
        raise MTKDError(
            f"{loss} needs aligned feature maps of the same shape, got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )


def mse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error of two aligned maps (B, C, *spatial); a float32 scalar."""
    _check_same_shape(student, teacher, "mse")
    with torch.autocast(device_type=student.device.type, enabled=False):
        return F.mse_loss(student.float(), teacher.float())


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """1 - cosine similarity along channels, per position of (B, C, *spatial), averaged.

    Zero when the maps point the same way at every position, 2 when opposite; a float32 scalar.
    """
    _check_same_shape(student, teacher, "cosine")
    with torch.autocast(device_type=student.device.type, enabled=False):
        similarity = F.cosine_similarity(student.float(), teacher.float(), dim=1, eps=eps)
        return (1.0 - similarity).mean()
