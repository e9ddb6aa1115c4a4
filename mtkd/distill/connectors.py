"""Connectors: learnable maps that align a student feature with a teacher feature."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.errors import MTKDError

if TYPE_CHECKING:
    from mtkd.distill.spec import TapPair

_CONVS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}
_POOLS = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def check_alignable(
    student_shape: Sequence[int],
    teacher_shape: Sequence[int],
    pair: TapPair,
    tolerance: float = 0.1,
) -> None:
    """Raise MTKDError unless a student map (B, Cs, *Ss) can be aligned with a teacher map
    (B, Ct, *St).

    Needed: the same rank with 1 to 3 spatial axes, the same batch size, and one common scale
    between the spatial grids: there must be an r with |St_i - r * Ss_i| <= max(1, tolerance *
    St_i) on every axis (one voxel of slack absorbs the rounding of odd sizes).
    """
    s, t = tuple(int(n) for n in student_shape), tuple(int(n) for n in teacher_shape)

    def fail(reason: str) -> MTKDError:
        return MTKDError(
            f"cannot align student tap '{pair.student}' {s} with teacher tap '{pair.teacher}' "
            f"{t}: {reason}"
        )

    if len(s) != len(t):
        raise fail(f"different ranks ({len(s) - 2}-D vs {len(t) - 2}-D feature maps)")
    if len(s) - 2 not in _CONVS:
        raise fail("feature maps must be (B, C, *spatial) with 1 to 3 spatial axes")
    if s[0] != t[0]:
        raise fail(f"different batch sizes ({s[0]} vs {t[0]})")
    if min(s[2:] + t[2:]) < 1:
        raise fail("empty spatial axis")
    low, high = 0.0, math.inf
    for size_s, size_t in zip(s[2:], t[2:]):
        slack = max(1.0, tolerance * size_t)
        low = max(low, (size_t - slack) / size_s)
        high = min(high, (size_t + slack) / size_s)
    if low > high:
        ratios = " x ".join(f"{b / a:.3g}" for a, b in zip(s[2:], t[2:]))
        raise fail(f"the spatial axes scale differently (teacher/student {ratios})")


class Connector(nn.Module):
    """Align a student feature with a teacher feature.

    A learnable 1x1 convolution maps the student's ``student_channels`` to the teacher's
    ``teacher_channels``; the teacher map is resized to the student's spatial size (adaptive
    average pooling when it shrinks on every axis, else linear/bilinear/trilinear
    interpolation with align_corners=False).

    forward(student (B, Cs, *Ss), teacher (B, Ct, *St)) -> (student_projected, teacher_aligned),
    both (B, Ct, *Ss).
    """

    def __init__(self, student_channels: int, teacher_channels: int, spatial_dims: int):
        super().__init__()
        if spatial_dims not in _CONVS:
            raise MTKDError(f"connector: spatial_dims must be 1, 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.proj = _CONVS[spatial_dims](student_channels, teacher_channels, kernel_size=1)

    @classmethod
    def for_shapes(cls, student_shape: Sequence[int], teacher_shape: Sequence[int]) -> Connector:
        """A connector for maps of these shapes (B, C, *spatial); check_alignable them first."""
        return cls(int(student_shape[1]), int(teacher_shape[1]), len(student_shape) - 2)

    def align_teacher(self, teacher: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Resize a teacher map (B, Ct, *St) to spatial ``size`` -> (B, Ct, *size)."""
        size = tuple(int(n) for n in size)
        current = tuple(teacher.shape[2:])
        if current == size:
            return teacher
        if all(c >= n for c, n in zip(current, size)):
            return _POOLS[self.spatial_dims](teacher, size)
        mode = _MODES[self.spatial_dims]
        return F.interpolate(teacher, size=size, mode=mode, align_corners=False)

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if student.ndim != self.spatial_dims + 2 or teacher.ndim != self.spatial_dims + 2:
            raise MTKDError(
                f"connector for {self.spatial_dims}-D maps got student {tuple(student.shape)} "
                f"and teacher {tuple(teacher.shape)}"
            )
        if student.shape[1] != self.student_channels or teacher.shape[1] != self.teacher_channels:
            raise MTKDError(
                f"connector maps {self.student_channels} -> {self.teacher_channels} channels, "
                f"got student {tuple(student.shape)} and teacher {tuple(teacher.shape)}"
            )
        return self.proj(student), self.align_teacher(teacher, student.shape[2:])

    def extra_repr(self) -> str:
        return f"{self.student_channels} -> {self.teacher_channels}, {self.spatial_dims}-D"
