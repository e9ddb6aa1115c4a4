"""The mapping between an image's grid and its model grid, and its inverse: network output
(probabilities on the model grid, whole or in slabs along z) back to a label map on the
original grid, chunk by chunk, so that no (C, X, Y, Z) volume on the original grid exists.

:mod:`mtkd.infer.model_grid` builds the mapping's orientation and spacing part and
:mod:`mtkd.infer.model_input` its crop, resize and padding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mtkd.infer.label_mapping import labels_of, resampled_labels
from mtkd.infer.memory import MAX_SLAB_BYTES
from mtkd.infer.separable import AxisSampling, concat_z, zeros_in_layout_of
from mtkd.infer.stages import stage

# (first model-grid z index, probabilities (C, X, Y, slices)) of consecutive slabs
ProbabilitySlab = tuple[int, torch.Tensor]


@dataclass(frozen=True)
class GridMapping:
    """What :func:`~mtkd.infer.model_input.preprocess` does, to map network output back onto
    the original grid.

    Oriented axis ``j`` is original axis ``permutation[j]``, reversed where ``flips[j]``.
    Resampled voxel ``o`` along axis ``j`` samples oriented coordinate
    ``scale[j] * o + offset[j]`` (identity when ``scale`` is None). ``crop_start``/``crop_stop``
    index the resampled grid; 2-D models resize the crop in-plane to ``resized``; 3-D models
    pad it by ``pad_before``/``pad_after`` to ``model_size``. Model-grid z slice ``m`` is
    resampled z slice ``m - pad_before[2] + crop_start[2]``.
    """

    original_size: tuple[int, int, int]
    permutation: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    oriented_size: tuple[int, int, int]
    resampled_size: tuple[int, int, int]
    scale: tuple[float, float, float] | None
    offset: tuple[float, float, float] | None
    crop_start: tuple[int, int, int]
    crop_stop: tuple[int, int, int]
    resized: tuple[int, int] | None
    pad_before: tuple[int, int, int]
    pad_after: tuple[int, int, int]
    model_size: tuple[int, int, int]

    @property
    def cropped_size(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.crop_start, self.crop_stop, strict=True))

    @property
    def same(self) -> list[bool]:
        """Per axis: True where resampling leaves the oriented grid as it is."""
        if self.scale is None:
            return [True, True, True]
        return [
            abs(self.scale[j] - 1.0) < 1e-12
            and abs(self.offset[j]) < 1e-12
            and self.resampled_size[j] == self.oriented_size[j]
            for j in range(3)
        ]

    def model_range(self, lo: int, hi: int) -> tuple[int, int]:
        """Model-grid z slices [a, b) holding the resampled z slices [lo, hi) inside the crop
        (a == b when none is)."""
        inside_lo = max(lo, self.crop_start[2])
        inside_hi = max(min(hi, self.crop_stop[2]), inside_lo)
        shift = self.pad_before[2] - self.crop_start[2]
        return inside_lo + shift, inside_hi + shift

    def to_original(
        self,
        prediction: torch.Tensor | Iterable[ProbabilitySlab],
        activation: str,
        n_labels: int = 255,
        chunk_bytes: int = MAX_SLAB_BYTES,
        device: torch.device | None = None,
    ) -> np.ndarray | torch.Tensor:
        """Probabilities on the model grid -> label map (X, Y, Z) on the original grid.

        ``prediction`` is (C, *model_size), or an iterable of (z0, probabilities (C, X', Y',
        z1 - z0)) giving the model grid in consecutive slabs along z from z0 = 0 (consumed in
        order; only the slabs the current chunk needs are kept). Probabilities are resampled
        linearly (zeros outside the crop, as MONAI's inverse pads) in chunks of oriented z
        slices of about ``chunk_bytes`` of float32, then argmax (or sigmoid > 0.5 for
        ``activation == "sigmoid"``) per chunk, so the (C, X, Y, Z) volume on the original
        grid never exists. The map is uint8 (int16 above 255 labels), a (X, Y, Z) view of a
        (Z, Y, X) C-ordered buffer, ready for ``to_sitk``: a NumPy array, or with ``device`` a
        torch tensor there (a GPU's labels then stay on the GPU, for post-processing).
        """
        if isinstance(prediction, torch.Tensor):
            if tuple(prediction.shape[1:]) != self.model_size:
                raise ValueError(
                    f"prediction {tuple(prediction.shape)} is not on {self.model_size}"
                )
            prediction = [(0, prediction)]
        window = _SlabWindow(iter(prediction), self.model_size)
        torch_dtype = torch.uint8 if n_labels <= 255 else torch.int16
        sink = _LabelSink(self, torch_dtype, device)
        axes = self._inverse_axes()
        support = [
            axis.reaching(a, b, size)
            for axis, a, b, size in zip(
                axes, self.crop_start, self.crop_stop, self.oriented_size, strict=True
            )
        ]
        if any(b <= a for a, b in support):
            return sink.labels  # every probability is 0 (an empty crop)
        (x0, x1), (y0, y1), (z0, z1) = support
        in_plane = [axes[0].source_range(x0, x1), axes[1].source_range(y0, y1)]
        plane = max((x1 - x0) * (y1 - y0), math.prod(hi - lo for lo, hi, _ in in_plane))
        step = max(1, chunk_bytes // max(1, 4 * window.channels * plane))
        for o0 in range(z0, z1, step):
            o1 = min(z1, o0 + step)
            reads = [*in_plane, axes[2].source_range(o0, o1)]
            block, first = window.covering(*self.model_range(*reads[2][:2]))
            labels = self._oriented_labels(block, first, reads, activation)
            sink.write([(x0, x1), (y0, y1), (o0, o1)], labels.to(torch_dtype))
        return sink.labels

    # ------------------------------------------------------------------ inverse pieces
    def _inverse_axes(self) -> list[AxisSampling]:
        """Per axis, the resampled-grid coordinate (float64) each oriented voxel samples."""
        axes = []
        for j in range(3):
            if self.same[j]:
                axes.append(AxisSampling(None, self.resampled_size[j]))
                continue
            positions = torch.arange(self.oriented_size[j], dtype=torch.float64)
            c = (positions - self.offset[j]) / self.scale[j]
            c = c.clamp_(0.0, self.resampled_size[j] - 1.0)
            axes.append(AxisSampling(c, self.resampled_size[j]))
        return axes

    def _oriented_labels(
        self,
        block: torch.Tensor,
        first: int,
        reads: list[tuple[int, int, torch.Tensor | None]],
        activation: str,
    ) -> torch.Tensor:
        """Labels of an oriented box, interpolated from the resampled box ``reads`` gives
        ([lo, hi) and coordinates per axis, as ``AxisSampling.source_range``); ``block`` holds
        model-grid z slices from ``first`` on."""
        with stage("inverse mapping"):
            resampled = self._resampled_block(block, first, [(lo, hi) for lo, hi, _ in reads])
        coords = [c for _, _, c in reads]
        if all(c is None for c in coords):
            with stage("argmax"):
                return labels_of(resampled, activation)
        return resampled_labels(resampled, coords, self._inverse_order(), activation)

    def _inverse_order(self) -> list[int]:
        """Resampled axes in the order the inverse interpolates them: most shrinking first,
        as ``resample_separable`` orders them for the whole volume."""
        axes = [j for j in range(3) if not self.same[j]]
        return sorted(axes, key=lambda j: self.oriented_size[j] / self.resampled_size[j])

    def _resampled_block(
        self, block: torch.Tensor, first: int, ranges: list[tuple[int, int]]
    ) -> torch.Tensor:
        """(C, *range sizes) probabilities of the resampled box ``ranges``, zero outside the
        crop; ``block`` holds the model-grid z slices from ``first`` on."""
        channels = block.shape[0]
        shape = tuple(hi - lo for lo, hi in ranges)
        inside = [
            (max(lo, start), min(hi, stop))
            for (lo, hi), start, stop in zip(ranges, self.crop_start, self.crop_stop, strict=True)
        ]
        if any(b <= a for a, b in inside):
            return block.new_zeros((channels, *shape), dtype=torch.float32)
        cropped = self._cropped_block(
            block, first, [(a - s, b - s) for (a, b), s in zip(inside, self.crop_start)]
        )
        if tuple(cropped.shape[1:]) == shape:
            return cropped
        out = zeros_in_layout_of(cropped, (channels, *shape))
        index = (slice(None),) + tuple(
            slice(a - lo, b - lo) for (a, b), (lo, _) in zip(inside, ranges, strict=True)
        )
        out[index] = cropped
        return out

    def _cropped_block(
        self, block: torch.Tensor, first: int, ranges: list[tuple[int, int]]
    ) -> torch.Tensor:
        """Cropped-grid probabilities (C, *range sizes) of the cropped-grid box ``ranges``,
        from ``block`` (model-grid z slices from ``first`` on)."""
        (x0, x1), (y0, y1), z_range = ranges
        z0, z1 = (z + self.pad_before[2] - first for z in z_range)
        if self.resized is None:  # 3-D: remove the padding
            px, py = self.pad_before[:2]
            return block[:, px + x0 : px + x1, py + y0 : py + y1, z0:z1].float()
        planes = block[..., z0:z1]
        size = self.cropped_size[:2]
        if tuple(self.resized) != tuple(size):
            # 2-D: undo the in-plane resize (torch's bilinear, align_corners=False, as MONAI)
            planes = planes.permute(3, 0, 1, 2).float()  # (Z, C, X', Y')
            planes = F.interpolate(planes, size=size, mode="bilinear", align_corners=False)
            planes = planes.permute(1, 2, 3, 0)
        return planes[:, x0:x1, y0:y1].float()


_NUMPY_DTYPES = {torch.uint8: np.uint8, torch.int16: np.int16}


class _LabelSink:
    """The label map on the original grid, written box by box in oriented axes (X', Y', Z'):
    a (Z, Y, X) NumPy buffer written through a flipped, permuted view of it, or a torch one on
    ``device`` (torch has no negative strides: each box is flipped and written at its mirrored
    place)."""

    def __init__(self, mapping: GridMapping, dtype: torch.dtype, device: torch.device | None):
        x_size, y_size, z_size = mapping.original_size
        self._flips = mapping.flips
        if device is None:
            out = np.zeros((z_size, y_size, x_size), dtype=_NUMPY_DTYPES[dtype])
            oriented = out.transpose(2, 1, 0).transpose(mapping.permutation)
            self._oriented = oriented[
                tuple(slice(None, None, -1) if f else slice(None) for f in mapping.flips)
            ]
            self.labels = out.transpose(2, 1, 0)
        else:
            out = torch.zeros((z_size, y_size, x_size), dtype=dtype, device=device)
            self._oriented = out.permute(2, 1, 0).permute(*mapping.permutation)
            self.labels = out.permute(2, 1, 0)

    def write(self, ranges: list[tuple[int, int]], labels: torch.Tensor) -> None:
        """Set the oriented box ``ranges`` ([lo, hi) per axis) to ``labels`` (its shape)."""
        if isinstance(self._oriented, np.ndarray):
            with stage("device to host"):
                values = labels.cpu().numpy()
            with stage("label copy"):
                self._oriented[tuple(slice(a, b) for a, b in ranges)] = values
            return
        flips = [j for j in range(3) if self._flips[j]]
        box = tuple(
            slice(n - b, n - a) if self._flips[j] else slice(a, b)
            for j, ((a, b), n) in enumerate(zip(ranges, self._oriented.shape, strict=True))
        )
        with stage("label copy"):
            self._oriented[box] = labels.flip(flips) if flips else labels


class _SlabWindow:
    """Consecutive model-grid slabs (z0, probabilities (C, X, Y, slices)) read in order; keeps
    only those the current request still needs."""

    def __init__(self, slabs: Iterator[ProbabilitySlab], model_size: tuple[int, int, int]):
        self._slabs = slabs
        self._model_size = model_size
        self._kept: list[ProbabilitySlab] = []
        self._end = 0
        self._pull()
        self.channels = int(self._kept[0][1].shape[0])

    def _pull(self) -> None:
        try:
            first, slab = next(self._slabs)
        except StopIteration:
            raise ValueError(
                f"the prediction ends at z = {self._end} of {self._model_size}"
            ) from None
        if first != self._end or tuple(slab.shape[1:3]) != tuple(self._model_size[:2]):
            raise ValueError(
                f"slab of shape {tuple(slab.shape)} at z = {first} does not continue the "
                f"prediction (next z = {self._end}, model grid {self._model_size})"
            )
        self._kept.append((first, slab))
        self._end = first + slab.shape[3]

    def covering(self, start: int, stop: int) -> tuple[torch.Tensor, int]:
        """(probabilities holding model z slices [start, stop), z index of its first slice).

        Requests must not move backwards: slabs ending at or before ``start`` are dropped.
        An empty request gives a slab not to be read (its channels and device only).
        """
        if stop <= start:
            first, slab = self._kept[-1]
            return slab, first
        while self._end < stop:
            self._pull()
        while len(self._kept) > 1 and self._kept[0][0] + self._kept[0][1].shape[3] <= start:
            self._kept.pop(0)
        needed = [
            (first, slab)
            for first, slab in self._kept
            if first < stop and first + slab.shape[3] > start
        ]
        if len(needed) <= 1:
            first, slab = needed[0] if needed else self._kept[0]
            return slab, first
        first = needed[0][0]
        return concat_z([slab for _, slab in needed]), first
