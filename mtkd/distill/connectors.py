"""Connectors: learnable maps that align a student feature with a teacher feature."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.distill.losses.supcon import (
    ANCHORS_PER_CLASS,
    DEFAULT_TEMPERATURE,
    MAX_ANCHORS,
    MEMORY_SIZE,
    SupervisedVoxelContrast,
)
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
        return align_map(teacher, size)

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_inputs(self, student, teacher)
        return self.proj(student), self.align_teacher(teacher, student.shape[2:])

    def extra_repr(self) -> str:
        return f"{self.student_channels} -> {self.teacher_channels}, {self.spatial_dims}-D"


def align_map(teacher: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize a map (B, C, *S) to spatial ``size`` -> (B, C, *size): adaptive average pooling
    when it shrinks on every axis, else (bi/tri)linear interpolation (align_corners=False)."""
    size = tuple(int(n) for n in size)
    current = tuple(teacher.shape[2:])
    if current == size:
        return teacher
    if all(c >= n for c, n in zip(current, size)):
        return _POOLS[teacher.ndim - 2](teacher, size)
    return F.interpolate(teacher, size=size, mode=_MODES[teacher.ndim - 2], align_corners=False)


def _check_inputs(connector: Connector | ContrastConnector, student, teacher) -> None:
    dims = connector.spatial_dims
    if student.ndim != dims + 2 or teacher.ndim != dims + 2:
        raise MTKDError(
            f"connector for {dims}-D maps got student {tuple(student.shape)} "
            f"and teacher {tuple(teacher.shape)}"
        )
    if (
        student.shape[1] != connector.student_channels
        or teacher.shape[1] != connector.teacher_channels
    ):
        raise MTKDError(
            f"connector takes {connector.student_channels} student and "
            f"{connector.teacher_channels} teacher channels, got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )


class ProjectionHead(nn.Sequential):
    """Voxel-wise embedding head: 1x1 conv (C -> D), ReLU, 1x1 conv (D -> D).

    (B, C, *spatial) -> (B, D, *spatial).
    """

    def __init__(self, in_channels: int, dim: int, spatial_dims: int):
        conv = _CONVS[spatial_dims]
        super().__init__(
            conv(in_channels, dim, kernel_size=1), nn.ReLU(), conv(dim, dim, kernel_size=1)
        )


class ContrastConnector(nn.Module):
    """Embed a student and a teacher feature in a common space, for the supervised voxel
    contrast (feature loss ``supcon``).

    ``student_head`` and ``teacher_head`` (:class:`ProjectionHead`, ``embed_dim`` channels) are
    both learnable and trained with the student (the teacher network itself stays frozen: its
    features come in detached); ``criterion`` is the :class:`SupervisedVoxelContrast` that
    compares the embeddings, with its memory. The teacher map is resized to the student's
    spatial size (as by :class:`Connector`) before its head.

    forward(student (B, Cs, *Ss), teacher (B, Ct, *St)) -> (student_embedding,
    teacher_embedding), both (B, embed_dim, *Ss); ``loss(student, teacher, labels)`` -> the
    scalar term for labels (B, *L) or (B, 1, *L) (resized to *Ss by nearest neighbour).
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        spatial_dims: int,
        num_classes: int,
        *,
        embed_dim: int = 128,
        temperature: float = DEFAULT_TEMPERATURE,
        anchors_per_class: int = ANCHORS_PER_CLASS,
        max_anchors: int = MAX_ANCHORS,
        memory_size: int = MEMORY_SIZE,
        ignore_index: int | None = None,
        seed: int | None = None,
    ):
        super().__init__()
        if spatial_dims not in _CONVS:
            raise MTKDError(f"connector: spatial_dims must be 1, 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.student_head = ProjectionHead(student_channels, embed_dim, spatial_dims)
        self.teacher_head = ProjectionHead(teacher_channels, embed_dim, spatial_dims)
        self.criterion = SupervisedVoxelContrast(
            embed_dim,
            num_classes,
            temperature=temperature,
            anchors_per_class=anchors_per_class,
            max_anchors=max_anchors,
            memory_size=memory_size,
            ignore_index=ignore_index,
            seed=seed,
        )

    @classmethod
    def for_shapes(
        cls, student_shape: Sequence[int], teacher_shape: Sequence[int], num_classes: int, **options
    ) -> ContrastConnector:
        """A connector for maps of these shapes (B, C, *spatial); check_alignable them first."""
        return cls(
            int(student_shape[1]),
            int(teacher_shape[1]),
            len(student_shape) - 2,
            num_classes,
            **options,
        )

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_inputs(self, student, teacher)
        aligned = align_map(teacher, student.shape[2:])
        return self.student_head(student), self.teacher_head(aligned)

    def loss(
        self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """The supervised voxel contrast of the embedded maps (a float32 scalar)."""
        return self.criterion(*self(student, teacher), labels)

    def extra_repr(self) -> str:
        return (
            f"{self.student_channels}, {self.teacher_channels} -> "
            f"{self.criterion.dim}, {self.spatial_dims}-D"
        )
