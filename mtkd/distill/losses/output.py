"""Prediction-map distillation (PMD): KL divergence of temperature-softened outputs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mtkd.errors import MTKDError

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def check_logits(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> None:
    """Raise MTKDError unless logits of these shapes (B, C, *spatial) can be compared by PMD."""
    s, t = tuple(student_shape), tuple(teacher_shape)
    if len(s) != len(t) or len(s) - 2 not in _MODES:
        raise MTKDError(
            f"output distillation needs student and teacher outputs of the same rank "
            f"(B, C, *spatial) with 1 to 3 spatial axes, got student {s} and teacher {t}"
        )
    if s[0] != t[0]:
        raise MTKDError(f"output distillation: batch sizes differ, student {s}, teacher {t}")
    if s[1] != t[1]:
        raise MTKDError(
            f"output distillation needs the same number of output channels (classes), got "
            f"student {s[1]} and teacher {t[1]}; distil only networks with the same labels"
        )


def softened_logits(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked float32 ``(z_s / T, z_t / T)`` for an output loss called ``name``.

    Raises MTKDError for incomparable shapes or a temperature that is not a finite number
    > 0. The teacher logits are detached and resized (linear interpolation) to the student's
    spatial size when they differ. Call it inside ``torch.autocast(..., enabled=False)``.
    """
    check_logits(student_logits.shape, teacher_logits.shape)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise MTKDError(f"{name} temperature must be a finite number > 0, got {temperature}")
    z_s = student_logits.float()
    z_t = teacher_logits.detach().float()
    if z_t.shape[2:] != z_s.shape[2:]:
        mode = _MODES[z_s.ndim - 2]
        z_t = F.interpolate(z_t, size=z_s.shape[2:], mode=mode, align_corners=False)
    return z_s / temperature, z_t / temperature


def pmd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0
) -> torch.Tensor:
    """KL(teacher || student) of temperature-softened predictions, times temperature^2.

    Multi-class logits (B, C > 1, *spatial): softmax over the class axis, KL summed over
    classes per voxel, averaged over voxels and images. One-channel (sigmoid) logits
    (B, 1, *spatial): Bernoulli KL between sigmoid(z_t / T) and sigmoid(z_s / T) per voxel,
    averaged. The teacher logits are detached and resized (linear interpolation) to the
    student's spatial size when they differ. Computed in float32; returns a scalar.
    """
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        z_s, z_t = softened_logits(student_logits, teacher_logits, temperature, "PMD")
        if z_s.shape[1] == 1:
            kl = _bernoulli_kl(z_t, z_s)
        else:
            log_p_s = F.log_softmax(z_s, dim=1)
            log_p_t = F.log_softmax(z_t, dim=1)
            kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
        return kl.mean() * temperature**2


def _bernoulli_kl(z_t: torch.Tensor, z_s: torch.Tensor) -> torch.Tensor:
    """Per-voxel KL(Bern(sigmoid(z_t)) || Bern(sigmoid(z_s))) from logits, via logsigmoid."""
    p_t = torch.sigmoid(z_t)
    log_p_t, log_q_t = F.logsigmoid(z_t), F.logsigmoid(-z_t)
    log_p_s, log_q_s = F.logsigmoid(z_s), F.logsigmoid(-z_s)
    return p_t * (log_p_t - log_p_s) + (1.0 - p_t) * (log_q_t - log_q_s)
