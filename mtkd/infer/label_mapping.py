"""Labels of linearly resampled probabilities, computed from labels wherever that is exact.

Resampling probabilities linearly and taking the argmax on the finer original grid is the
costly end of inference: every channel is interpolated at every voxel. But a linearly
interpolated voxel is a weighted mean (weights >= 0) of the source voxels it reads, and if
each of those has the same first-highest channel ``L`` (``p_L > p_k`` for k < L, ``p_L >=
p_k`` for k > L), so has their mean. So :func:`resampled_labels` takes the argmax on the
source grid, and per target voxel the lowest and highest label among the source voxels it
reads (a separable min/max over the same two neighbours per axis as the interpolation); where
they agree that is the label, and only the other voxels (along label borders, typically a few
per cent) get their probabilities interpolated, in the same axis order and with the same
operations as :func:`~mtkd.infer.separable.resample_separable`. Sigmoid outputs work alike
(all > 0.5, or all <= 0.5). The result equals the argmax of the fully resampled
probabilities except where two channels tie to float rounding. Speckled label maps (more than
``DENSE_ABOVE`` of the source voxels on a border), and targets with no more voxels than the
source (where the dense argmax is the smaller one), are resampled densely instead, the last
axis channel by channel into a running maximum (no (C, X, Y, Z) volume on the target grid).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from mtkd.infer.separable import interpolate_axis, resample_separable
from mtkd.infer.stages import stage

# above this share of source voxels on a label border, all target voxels are interpolated (a
# sparse gather costs several times a dense pass per voxel): the crossover measured by
# bench/label_mapping_crossover.py (2-core CPU, 4 channels) lies between 4 % and 7 %
DENSE_ABOVE = 0.06


def _first_highest(channels: Iterator[torch.Tensor]) -> torch.Tensor:
    """Index (int16) of the first highest of the equally shaped float tensors ``channels``
    yields, voxel by voxel; the first one becomes the running maximum (it is overwritten)."""
    best = labels = None
    for channel, values in enumerate(channels):
        if best is None:
            best = values
            labels = torch.zeros(values.shape, dtype=torch.int16, device=values.device)
        else:
            labels.masked_fill_(values > best, channel)
            torch.maximum(best, values, out=best)
    return labels


def labels_of(probabilities: torch.Tensor, activation: str) -> torch.Tensor:
    """(C, ...) probabilities -> (...) labels: sigmoid > 0.5, or the first channel of highest
    probability (``argmax``; on the CPU a channel loop in memory order, several times faster
    than argmax over a non-innermost dimension)."""
    if activation == "sigmoid":
        return probabilities[0] > 0.5
    if probabilities.device.type != "cpu" or probabilities.shape[0] > 64:
        return probabilities.argmax(dim=0)
    spatial = sorted(range(1, probabilities.ndim), key=lambda d: (-probabilities.stride(d), d))
    ordered = probabilities.permute(0, *spatial)
    first = ordered[0].clone(memory_format=torch.contiguous_format)
    labels = _first_highest(iter([first, *ordered[1:]]))
    return labels.permute([spatial.index(d) for d in range(1, probabilities.ndim)])


def _neighbours(
    coords: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per target voxel along one axis: the two source voxels a linear interpolation at
    ``coords`` reads (as :func:`~mtkd.infer.separable.resample_separable`: the lower one
    clamped to ``size - 2``), the second replaced by the first where its weight is 0, and
    the weight (float32; None for a source of one voxel, which every target copies)."""
    if size == 1:
        zeros = torch.zeros_like(coords, dtype=torch.long)
        return zeros, zeros, None
    low = coords.floor().long().clamp_(0, size - 2)
    weight = (coords - low).to(torch.float32)
    high = torch.where(weight > 0, low + 1, low)
    return low, high, weight


def _label_range(labels: torch.Tensor, reads: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Lowest and highest source label each target voxel reads: (X, Y, Z) each."""
    lowest = highest = labels
    for axis, read in enumerate(reads):
        if read is None:
            continue
        low, high = (index.to(labels.device) for index in read[:2])
        index: list = [slice(None)] * 3
        index[axis] = low
        first_low, first_high = lowest[tuple(index)], highest[tuple(index)]
        index[axis] = high
        lowest = torch.minimum(first_low, lowest[tuple(index)])
        highest = torch.maximum(first_high, highest[tuple(index)])
    return lowest, highest


def _border_share(labels: torch.Tensor, reads: list) -> float:
    """Share of source voxels (X, Y, Z) ``labels`` whose next voxel along a resampled axis
    has another label: about the share of target voxels on a border."""
    border = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    for axis, read in enumerate(reads):
        if read is not None and labels.shape[axis] > 1:
            ahead = labels.narrow(axis, 1, labels.shape[axis] - 1)
            behind = labels.narrow(axis, 0, labels.shape[axis] - 1)
            border.narrow(axis, 0, labels.shape[axis] - 1).logical_or_(ahead != behind)
    return float(border.float().mean())


def _interpolate_at(
    probabilities: torch.Tensor, points: torch.Tensor, reads: list, order: list[int]
) -> torch.Tensor:
    """Probabilities (C, N) of the target voxels ``points`` (N, 3), interpolated from the
    source's (C, X, Y, Z) along the axes in ``order``, one after the other, as
    ``resample_separable`` does."""
    strides = probabilities.stride()
    # the source as (C, memory span): one flat index per voxel, whatever the layout
    span = 1 + sum((n - 1) * st for n, st in zip(probabilities.shape[1:], strides[1:]))
    flat = probabilities.as_strided((probabilities.shape[0], span), (strides[0], 1))
    offset = torch.zeros(points.shape[0], dtype=torch.long, device=points.device)
    steps = []
    for axis, read in enumerate(reads):
        target = points[:, axis]
        if read is None:
            offset += target * strides[1 + axis]
            continue
        low, _, weight = read
        offset += low.to(points.device)[target] * strides[1 + axis]
        if weight is not None:  # the upper neighbour (low <= size - 2, as the dense path)
            steps.append((axis, strides[1 + axis], weight.to(points.device)[target]))
    # corners by their offsets along the interpolated axes, lerped in ``order``
    corners = {(): offset}
    for _axis, stride, _ in steps:
        corners = {key + (d,): index + d * stride for key, index in corners.items() for d in (0, 1)}
    values = {key: flat[:, index].float() for key, index in corners.items()}
    positions = [axis for axis, _, _ in steps]
    weights = {axis: weight for axis, _, weight in steps}
    for axis in order:
        if axis not in positions:
            continue
        at, weight = positions.index(axis), weights[axis]
        values = {
            key[:at] + key[at + 1 :]: value.lerp_(values[key[:at] + (1,) + key[at + 1 :]], weight)
            for key, value in values.items()
            if key[at] == 0
        }
        positions.pop(at)
    (result,) = values.values()
    return result


def _dense_labels(
    probabilities: torch.Tensor, coords: list, order: list[int], activation: str
) -> torch.Tensor:
    """Labels of every voxel's interpolated probabilities, as ``labels_of(resample_separable(
    ...))`` but without the (C, X, Y, Z) resampled volume: the axes of ``order`` but its last
    for all channels at once, then the last channel by channel into a running maximum (one
    write of the largest arrays instead of C, and no argmax pass over them)."""
    *leading, last = order
    with stage("inverse mapping"):
        same = [c is None or j not in leading for j, c in enumerate(coords)]
        partial = resample_separable(probabilities, coords, same, leading)
    # the spatial axes in memory order, so that each pass streams through memory
    layout = sorted(range(3), key=lambda d: (-partial.stride(1 + d), d))
    axis = layout.index(last)

    def channel_values(channels: int) -> Iterator[torch.Tensor]:
        for channel in range(channels):
            with stage("inverse mapping"):
                values = interpolate_axis(partial[channel].permute(layout), axis, coords[last])
            yield values

    with stage("argmax"):
        if activation == "sigmoid":
            labels = next(channel_values(1)) > 0.5
        else:
            labels = _first_highest(channel_values(partial.shape[0]))
    return labels.permute([layout.index(d) for d in range(3)])


def resampled_labels(
    probabilities: torch.Tensor,
    coords: list[torch.Tensor | None],
    order: list[int],
    activation: str,
) -> torch.Tensor:
    """Labels (X, Y, Z) of ``probabilities`` (C, X', Y', Z') resampled linearly: spatial axis j
    at source coordinates ``coords[j]`` (float64, within the axis; None: kept as it is), axes
    interpolated in ``order``. Equal to ``labels_of(resample_separable(...))`` except where
    two channels tie to float rounding."""
    source_shape = probabilities.shape[1:]
    target_shape = [n if c is None else len(c) for n, c in zip(source_shape, coords, strict=True)]
    if math.prod(target_shape) <= math.prod(source_shape):  # the argmax of fewer voxels
        return _dense_labels(probabilities, coords, order, activation)
    with stage("argmax"):
        source = labels_of(probabilities, activation)
        if source.dtype == torch.bool:
            source = source.to(torch.uint8)
    reads = [
        None if c is None else _neighbours(c, probabilities.shape[1 + j])
        for j, c in enumerate(coords)
    ]
    with stage("label mapping"):
        speckled = _border_share(source, reads) > DENSE_ABOVE
    if speckled:  # interpolating every voxel is cheaper than gathering most of them
        return _dense_labels(probabilities, coords, order, activation)
    with stage("label mapping"):
        lowest, highest = _label_range(source, reads)
        border = torch.nonzero(lowest != highest)
    if border.shape[0] == 0:
        return lowest
    with stage("inverse mapping"):
        values = _interpolate_at(probabilities, border, reads, order)
    with stage("argmax"):
        labels = lowest.clone()
        found = labels_of(values, activation).to(labels.dtype)
        labels[border[:, 0], border[:, 1], border[:, 2]] = found
    return labels
