"""Separable linear resampling of torch tensors: one gather + lerp per axis, on MONAI's exact
sampling grid, in the tensor's memory order.

:class:`AxisSampling` says which source voxels a range of target voxels reads, so that a slab
of a volume is resampled with the same operations on the same values as the whole volume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AxisSampling:
    """Along one axis, target voxel ``t`` interpolates source coordinate ``coords[t]``
    (float64, within [0, source_size - 1]), or is source voxel ``t`` when ``coords`` is None."""

    coords: torch.Tensor | None
    source_size: int

    def source_range(self, start: int, stop: int) -> tuple[int, int, torch.Tensor | None]:
        """Source voxels [lo, hi) that target voxels [start, stop) read, and their coordinates
        relative to ``lo`` (None without interpolation). Interpolating the block [lo, hi) at
        them gives the same values as the whole axis at ``coords[start:stop]``."""
        if self.coords is None:
            return start, stop, None
        along = self.coords[start:stop]
        lo = min(int(math.floor(float(along.min()))), max(self.source_size - 2, 0))
        hi = min(int(math.floor(float(along.max()))) + 2, self.source_size)
        return lo, hi, along - lo

    def reaching(self, start: int, stop: int, target_size: int) -> tuple[int, int]:
        """Target voxels [a, b) (of ``target_size``) that read a source voxel in
        [start, stop); every other target voxel reads none."""
        if self.coords is None:
            return start, stop
        top = max(self.source_size - 2, 0)
        low = self.coords.floor().clamp_(0, top)  # the first of the two voxels each one reads
        a = int(torch.searchsorted(low, float(start - 1)))  # low + 1 >= start
        b = int(torch.searchsorted(low, float(stop), right=False))  # low < stop
        return min(a, target_size), min(max(b, a), target_size)


def concat_z(blocks: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate (..., X, Y, Z_i) blocks along the last axis, keeping z outermost in memory."""
    moved = [b.movedim(-1, 0) for b in blocks]
    return torch.cat(moved).movedim(0, -1)


def zeros_in_layout_of(reference: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 zeros of ``shape`` whose dimensions lie in memory in ``reference``'s order (so
    that copying ``reference`` into them reads and writes memory sequentially)."""
    layout = sorted(range(reference.ndim), key=lambda d: (-reference.stride(d), d))
    zeros = reference.new_zeros([shape[d] for d in layout], dtype=torch.float32)
    return zeros.permute([layout.index(d) for d in range(reference.ndim)])


def interpolate_axis(x: torch.Tensor, axis: int, coords: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``x`` along ``axis`` at ``coords`` (in [0, n - 1]) -> float32.

    ``x`` (any dtype) keeps its other axes; the result (contiguous) has ``len(coords)`` along
    ``axis``.
    """
    size = x.shape[axis]
    coords = coords.to(x.device)
    index: list = [slice(None)] * x.ndim
    if size == 1:
        index[axis] = torch.zeros_like(coords, dtype=torch.long)
        return x[tuple(index)].float()
    low = coords.floor().long().clamp_(0, size - 2)
    weight = (coords - low).to(torch.float32)
    index[axis] = low
    first = x[tuple(index)]  # advanced indexing: much faster than index_select off dim 0
    index[axis] = low + 1
    second = x[tuple(index)]
    if first.dtype != torch.float32:
        first, second = first.float(), second.float()
    shape = [1] * x.ndim
    shape[axis] = -1
    return first.lerp_(second, weight.view(shape))


def resample_separable(
    x: torch.Tensor,
    coords: list[torch.Tensor | None],
    same: list[bool],
    order: list[int] | None = None,
) -> torch.Tensor:
    """Separable linear resampling of (C, *spatial) ``x``: spatial axis j is sampled at
    ``coords[j]`` unless ``same[j]``, axes in ``order`` (default: the axis that shrinks most
    first). A slab of a volume resampled with the same ``order`` gives the same values.

    The work runs in ``x``'s memory order (outermost stride first), so every pass reads and
    writes memory sequentially; the result is a view in that layout.
    """
    if order is None:
        order = [j for j in range(len(coords)) if not same[j]]
        order.sort(key=lambda j: len(coords[j]) / x.shape[1 + j])
    if not order:
        return x.float()
    layout = sorted(range(x.ndim), key=lambda d: (-x.stride(d), d))
    x = x.permute(layout)
    for j in order:
        x = interpolate_axis(x, layout.index(1 + j), coords[j])
    return x.float().permute([layout.index(d) for d in range(len(layout))])
