"""Inference preprocessing with plain torch ops on the target device, and its inverse, in parts.

``preprocess`` gives the same (1, X, Y, Z) tensor as ``build_transforms(prep)`` (MONAI:
orientation to RAS, spacing, HU window, foreground crop, in-plane resize or patch padding)
without MetaTensors or grid_sample: the orientation is a permutation (a view) plus flips, and
resampling is separable linear interpolation (one gather + lerp per axis, on MONAI's exact
sampling grid).

Large volumes are processed in slabs of axial (oriented z) slices, so that no full-resolution
float copy of the image and no full-resolution probability volume is ever held:
:class:`ModelInput` computes any range of the network input's z slices from the image on demand
(the foreground crop is found in a first pass over slabs), and :meth:`GridMapping.to_original`
maps network output back onto the input image's grid chunk by chunk, from one tensor or from
slabs delivered in order. Every slab is computed with the same operations on the same values as
the whole volume, so the result does not depend on the slab sizes.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from monai.data.utils import AFFINE_TOL, affine_to_spacing, compute_shape_offset, zoom_affine

from mtkd.data.headers import MAX_VOXELS
from mtkd.data.preprocess import Preprocessing, sitk_affine_ras
from mtkd.errors import MTKDError
from mtkd.infer.memory import MAX_SLAB_BYTES

# Largest off-diagonal term of the voxel-to-voxel resampling matrix still taken as separable.
_SEPARABLE_TOL = 1e-6
_TORCH_DTYPES = (np.float32, np.float64, np.float16, np.int8, np.uint8, np.int16, np.int32)

# (first model-grid z index, probabilities (C, X, Y, slices)) of consecutive slabs
ProbabilitySlab = tuple[int, torch.Tensor]


class NotSeparableError(ValueError):
    """The spacing resample of this image is not per-axis (sheared voxel axes)."""


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


@dataclass(frozen=True)
class GridMapping:
    """What ``preprocess`` does, to map network output back onto the original grid.

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
    ) -> np.ndarray:
        """Probabilities on the model grid -> label map (X, Y, Z) on the original grid.

        ``prediction`` is (C, *model_size), or an iterable of (z0, probabilities (C, X', Y',
        z1 - z0)) giving the model grid in consecutive slabs along z from z0 = 0 (consumed in
        order; only the slabs the current chunk needs are kept). Probabilities are resampled
        linearly (zeros outside the crop, as MONAI's inverse pads) in chunks of oriented z
        slices of about ``chunk_bytes`` of float32, then argmax (or sigmoid > 0.5 for
        ``activation == "sigmoid"``) per chunk, so the (C, X, Y, Z) volume on the original
        grid never exists. The array is uint8 (int16 above 255 labels), a (X, Y, Z) view of a
        (Z, Y, X) C-ordered buffer, ready for ``to_sitk``.
        """
        if isinstance(prediction, torch.Tensor):
            if tuple(prediction.shape[1:]) != self.model_size:
                raise ValueError(
                    f"prediction {tuple(prediction.shape)} is not on {self.model_size}"
                )
            prediction = [(0, prediction)]
        window = _SlabWindow(iter(prediction), self.model_size)
        dtype = np.uint8 if n_labels <= 255 else np.int16
        torch_dtype = torch.uint8 if n_labels <= 255 else torch.int16
        x_size, y_size, z_size = self.original_size
        out = np.zeros((z_size, y_size, x_size), dtype=dtype)
        oriented = self._oriented_view(out)
        axes = self._inverse_axes()
        support = [
            axis.reaching(a, b, size)
            for axis, a, b, size in zip(
                axes, self.crop_start, self.crop_stop, self.oriented_size, strict=True
            )
        ]
        if any(b <= a for a, b in support):
            return out.transpose(2, 1, 0)  # every probability is 0 (an empty crop)
        (x0, x1), (y0, y1), (z0, z1) = support
        in_plane = [axes[0].source_range(x0, x1), axes[1].source_range(y0, y1)]
        plane = max((x1 - x0) * (y1 - y0), math.prod(hi - lo for lo, hi, _ in in_plane))
        step = max(1, chunk_bytes // max(1, 4 * window.channels * plane))
        for o0 in range(z0, z1, step):
            o1 = min(z1, o0 + step)
            reads = [*in_plane, axes[2].source_range(o0, o1)]
            block, first = window.covering(*self.model_range(*reads[2][:2]))
            labels = self._oriented_labels(block, first, reads, activation)
            oriented[x0:x1, y0:y1, o0:o1] = labels.to(torch_dtype).cpu().numpy()
        return out.transpose(2, 1, 0)

    # ------------------------------------------------------------------ inverse pieces
    def _oriented_view(self, out: np.ndarray) -> np.ndarray:
        """A view of ``out`` (Z, Y, X) in oriented axis order and direction (X', Y', Z')."""
        oriented = out.transpose(2, 1, 0).transpose(self.permutation)
        return oriented[tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)]

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
        resampled = self._resampled_block(block, first, [(lo, hi) for lo, hi, _ in reads])
        coords = [c for _, _, c in reads]
        same = [c is None for c in coords]
        if all(same):
            return _labels(resampled, activation)
        return _labels(_resample(resampled, coords, same, self._inverse_order()), activation)

    def _inverse_order(self) -> list[int]:
        """Resampled axes in the order the inverse interpolates them: most shrinking first,
        as ``_resample`` orders them for the whole volume."""
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
        out = _zeros_in_layout_of(cropped, (channels, *shape))
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
        return _cat_z([slab for _, slab in needed]), first


def _cat_z(blocks: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate (..., X, Y, Z_i) blocks along the last axis, keeping z outermost in memory."""
    moved = [b.movedim(-1, 0) for b in blocks]
    return torch.cat(moved).movedim(0, -1)


def _zeros_in_layout_of(reference: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 zeros of ``shape`` whose dimensions lie in memory in ``reference``'s order (so
    that copying ``reference`` into them reads and writes memory sequentially)."""
    layout = sorted(range(reference.ndim), key=lambda d: (-reference.stride(d), d))
    zeros = reference.new_zeros([shape[d] for d in layout], dtype=torch.float32)
    return zeros.permute([layout.index(d) for d in range(reference.ndim)])


def _labels(probabilities: torch.Tensor, activation: str) -> torch.Tensor:
    """(C, ...) probabilities -> (...) labels: sigmoid > 0.5, or the first channel of highest
    probability (``argmax``; on the CPU a channel loop in memory order, several times faster
    than argmax over a non-innermost dimension)."""
    if activation == "sigmoid":
        return probabilities[0] > 0.5
    if probabilities.device.type != "cpu" or probabilities.shape[0] > 64:
        return probabilities.argmax(dim=0)
    spatial = sorted(range(1, probabilities.ndim), key=lambda d: (-probabilities.stride(d), d))
    ordered = probabilities.permute(0, *spatial)
    best = ordered[0].clone(memory_format=torch.contiguous_format)
    labels = torch.zeros(best.shape, dtype=torch.int16)
    for channel in range(1, ordered.shape[0]):
        candidate = ordered[channel]
        labels.masked_fill_(candidate > best, channel)
        torch.maximum(best, candidate, out=best)
    return labels.permute([spatial.index(d) for d in range(1, probabilities.ndim)])


def _linear_axis(x: torch.Tensor, axis: int, coords: torch.Tensor) -> torch.Tensor:
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


def _resample(
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
        x = _linear_axis(x, layout.index(1 + j), coords[j])
    return x.float().permute([layout.index(d) for d in range(len(layout))])


# ---------------------------------------------------------------------- forward geometry
def orientation_to_ras(
    affine: np.ndarray, shape: tuple[int, int, int]
) -> tuple[tuple[int, int, int], tuple[bool, bool, bool], np.ndarray]:
    """(permutation, flips, oriented affine) of MONAI's ``Orientation("RAS")``.

    Oriented axis ``j`` is input axis ``permutation[j]``, reversed where ``flips[j]``.
    """
    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt("RAS")
    )
    permutation = tuple(int(i) for i in np.argsort(ornt[:, 0]))
    flips = tuple(bool(ornt[i, 1] == -1) for i in permutation)
    oriented = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    return permutation, flips, oriented


def spacing_grid(
    affine: np.ndarray, shape: tuple[int, int, int], pixdim: tuple[float, float, float]
) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray] | None:
    """MONAI ``Spacing(pixdim, diagonal=False)``'s output grid for an image (``affine``,
    ``shape``): (output shape, scale, offset) with output voxel ``o`` sampling input
    coordinate ``scale * o + offset`` per axis, or None when MONAI leaves the image as it is.

    Raises NotSeparableError when the voxel-to-voxel map is not diagonal.
    """
    target = np.asarray(pixdim, dtype=np.float64)
    current = affine_to_spacing(affine, 3, np.float64)
    out_d = target.copy()
    for i in range(3):  # spacings within MONAI's tolerance are kept exactly
        if target[i] - AFFINE_TOL <= current[i] <= target[i] + AFFINE_TOL:
            out_d[i] = current[i]
    new_affine = zoom_affine(affine, out_d, diagonal=False)
    out_shape, offset = compute_shape_offset(shape, affine, new_affine)
    new_affine[:3, 3] = offset[:3]
    xform = np.linalg.solve(affine, new_affine)
    same_size = tuple(int(s) for s in out_shape) == tuple(shape)
    unchanged = np.allclose(affine, new_affine, atol=AFFINE_TOL) or np.allclose(
        xform, np.eye(4), atol=AFFINE_TOL
    )
    if unchanged and same_size:
        return None
    linear = xform[:3, :3]
    if np.abs(linear - np.diag(np.diag(linear))).max() > _SEPARABLE_TOL:
        raise NotSeparableError("the resampling matrix is not diagonal")
    return tuple(int(s) for s in out_shape), np.diag(linear).copy(), xform[:3, 3].copy()


def _box_from_masks(
    in_plane: torch.Tensor, along_z: torch.Tensor, margin: int
) -> tuple[list[int], list[int]] | None:
    """MONAI's bounding box (with ``margin``, clipped to the image) of the foreground whose
    in-plane projection is ``in_plane`` (X, Y) and whose z profile is ``along_z`` (Z)."""
    start, stop = [], []
    for mask in (in_plane.any(dim=1), in_plane.any(dim=0), along_z):
        where = torch.nonzero(mask).flatten().cpu()
        if where.numel() == 0:
            return None
        start.append(max(int(where[0]) - margin, 0))
        stop.append(min(int(where[-1]) + margin + 1, mask.numel()))
    return start, stop


def _max_projections(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Maxima of (X, Y, Z) ``x`` over z (X, Y) and over x and y (Z), reduced in the (Z, Y, X)
    memory order of image slabs (several times faster than reducing across it)."""
    zyx = x.permute(2, 1, 0)
    if not zyx.is_contiguous():
        zyx = zyx.contiguous()
    return zyx.amax(dim=0).t(), zyx.reshape(zyx.shape[0], -1).amax(dim=1)


def _voxels_view(image: sitk.Image) -> np.ndarray:
    """The image's voxels as a read-only (X, Y, Z) NumPy view of the SimpleITK buffer (the
    caller keeps ``image`` alive)."""
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        raise MTKDError(
            f"expected a 3-D scalar image, got {image.GetDimension()}-D with "
            f"{image.GetNumberOfComponentsPerPixel()} components per voxel"
        )
    return sitk.GetArrayViewFromImage(image).transpose(2, 1, 0)


def _as_tensor(voxels: np.ndarray) -> torch.Tensor:
    """A NumPy block as a tensor: a view for dtypes torch has, else a float32 copy."""
    if voxels.dtype.type not in _TORCH_DTYPES:
        voxels = voxels.astype(np.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(voxels)


def check_resampled_size(image: sitk.Image, prep: Preprocessing) -> None:
    """MTKDError when ``image`` at the model's spacing would hold more than ``MAX_VOXELS``
    voxels (e.g. a CT whose header gives metres as millimetres), before anything is allocated.
    The count is the image's volume over the model voxel's, whatever the orientation."""
    if prep.spacing is None:
        return
    volume = math.prod(image.GetSize()) * math.prod(image.GetSpacing())
    voxels = volume / math.prod(prep.spacing)
    if voxels > MAX_VOXELS:
        raise MTKDError(
            f"at the model's spacing {list(prep.spacing)} mm this image (spacing "
            f"{[round(s, 4) for s in image.GetSpacing()]} mm, size {list(image.GetSize())}) "
            f"would have about {voxels:.3g} voxels, more than the {MAX_VOXELS} MTKD processes; "
            "is the spacing in the header right?"
        )


def _resampled_grid(image: sitk.Image, prep: Preprocessing) -> GridMapping:
    """The mapping of ``image`` to its grid oriented to RAS and resampled to ``prep.spacing``
    (the model grid for now: no crop, resize or padding yet)."""
    check_resampled_size(image, prep)
    original_size = tuple(int(s) for s in image.GetSize())
    permutation, flips, oriented_affine = orientation_to_ras(sitk_affine_ras(image), original_size)
    oriented_size = tuple(original_size[i] for i in permutation)
    grid = None
    if prep.spacing is not None:
        grid = spacing_grid(oriented_affine, oriented_size, prep.spacing)
    resampled_size, scale, offset = oriented_size, None, None
    if grid is not None:
        resampled_size = tuple(int(s) for s in grid[0])
        scale = tuple(float(s) for s in grid[1])
        offset = tuple(float(o) for o in grid[2])
    return GridMapping(
        original_size=original_size,
        permutation=permutation,
        flips=flips,
        oriented_size=oriented_size,
        resampled_size=resampled_size,
        scale=scale,
        offset=offset,
        crop_start=(0, 0, 0),
        crop_stop=resampled_size,
        resized=None,
        pad_before=(0, 0, 0),
        pad_after=(0, 0, 0),
        model_size=resampled_size,
    )


class ModelInput:
    """The network input of one image, computed slab by slab from its voxels.

    ``slab(m0, m1)`` gives model-grid z slices [m0, m1) as (1, X', Y', m1 - m0) float32 on
    ``device``, equal to those slices of the whole preprocessed volume (``whole()``, which is
    what ``build_transforms(prep)`` gives, to float32 rounding); ``mapping`` maps network
    output back. Only a view of the image's voxels is kept (keep the image alive), in its own
    dtype; each slab reads, converts and resamples about ``slab_bytes`` of float32 at a time.
    With ``prep.crop_foreground`` the crop box is found by a first pass over the slabs.

    Raises NotSeparableError for sheared voxel grids (use the MONAI transforms for those).
    """

    def __init__(
        self,
        image: sitk.Image,
        prep: Preprocessing,
        device: torch.device | str = "cpu",
        slab_bytes: int = MAX_SLAB_BYTES,
    ):
        self.prep = prep
        self.device = torch.device(device)
        voxels = _voxels_view(image)  # checks that the image is 3-D and scalar
        mapping = _resampled_grid(image, prep)
        self._voxels = voxels.transpose(mapping.permutation)  # oriented, still unflipped
        self._axes, self._pending_flips = self._forward_axes(mapping)
        self._order = [j for j in range(3) if not mapping.same[j]]
        self._order.sort(key=lambda j: mapping.resampled_size[j] / mapping.oriented_size[j])
        plane = max(math.prod(mapping.resampled_size[:2]), math.prod(mapping.oriented_size[:2]))
        self.slab_depth = max(1, int(slab_bytes) // (4 * plane))
        self.mapping = mapping  # the resampled grid, until the crop is known
        self.mapping = self._with_crop_and_model_size(mapping)

    # ------------------------------------------------------------------ public
    def slab(self, m0: int, m1: int) -> torch.Tensor:
        """Network input (1, X', Y', m1 - m0) of model-grid z slices [m0, m1)."""
        pieces = [
            self._model_slab(a, min(a + self.slab_depth, m1))
            for a in range(m0, m1, self.slab_depth)
        ]
        return (pieces[0] if len(pieces) == 1 else _cat_z(pieces))[None]

    def whole(self) -> torch.Tensor:
        """The whole network input (1, *model_size)."""
        return self.slab(0, self.mapping.model_size[2])

    # ------------------------------------------------------------------ forward pieces
    def _forward_axes(self, mapping: GridMapping) -> tuple[list[AxisSampling], list[bool]]:
        """Per axis the oriented coordinate (float64) each resampled voxel samples (flips
        folded in where the axis is resampled), and the flips left to apply after it."""
        pending = list(mapping.flips)
        axes = []
        for j, size in enumerate(mapping.oriented_size):
            if mapping.same[j]:
                axes.append(AxisSampling(None, size))
                continue
            positions = torch.arange(mapping.resampled_size[j], dtype=torch.float64)
            c = (positions * mapping.scale[j] + mapping.offset[j]).clamp_(0, size - 1)
            if mapping.flips[j]:
                c = (size - 1) - c  # the flip folded into the gather
                pending[j] = False
            axes.append(AxisSampling(c, size))
        return axes, pending

    def _source_block(self, ranges: list[tuple[int, int]]) -> tuple[np.ndarray, list]:
        """The image voxels (oriented axes, unflipped; a view) that the resampled box
        ``ranges`` reads, and per axis the coordinates to interpolate them at (or None)."""
        index, coords = [], []
        for axis, flipped, size, (a, b) in zip(
            self._axes, self._pending_flips, self.mapping.oriented_size, ranges, strict=True
        ):
            lo, hi, along = axis.source_range(a, b)
            if flipped:  # not resampled: the mirrored range, flipped afterwards
                lo, hi = size - hi, size - lo
            index.append(slice(lo, hi))
            coords.append(along)
        return self._voxels[tuple(index)], coords

    def _resampled(self, ranges: list[tuple[int, int]]) -> torch.Tensor:
        """Windowed float32 (X, Y, Z) of the resampled box ``ranges`` on ``device``."""
        block, coords = self._source_block(ranges)
        owned = block.dtype.type not in _TORCH_DTYPES or self.device.type != "cpu"
        x = _as_tensor(block).to(self.device)
        if self._order:
            same = [c is None for c in coords]
            x = _resample(x[None], coords, same, self._order)[0]
            owned = True
        flip_axes = [j for j in range(3) if self._pending_flips[j]]
        if flip_axes:
            x = x.flip(flip_axes)
            owned = True
        if x.dtype != torch.float32:
            x = x.float()
            owned = True
        low, high = self.prep.hu_window
        if owned:
            x.sub_(low).div_(high - low)
        else:
            x = (x - low) / (high - low)  # never write into (or alias) the image's buffer
        return x.clamp_(0.0, 1.0)

    def _with_crop_and_model_size(self, mapping: GridMapping) -> GridMapping:
        """``mapping`` with the foreground crop (one pass over the slabs), the 2-D in-plane
        resize or the 3-D padding, and the model grid's size."""
        crop_start, crop_stop = mapping.crop_start, mapping.crop_stop
        if self.prep.crop_foreground:
            box = self._foreground_box(mapping.resampled_size, margin=2)
            if box is not None:  # MONAI would crop an empty image to nothing; keep it whole
                crop_start, crop_stop = tuple(box[0]), tuple(box[1])
        cropped = [b - a for a, b in zip(crop_start, crop_stop, strict=True)]
        resized = None
        pad_before = pad_after = (0, 0, 0)
        if self.prep.dims == 2:
            resized = tuple(int(s) for s in self.prep.slice_size)
            model_size = (*resized, cropped[2])
        else:
            widths = [max(p - s, 0) for p, s in zip(self.prep.patch_size, cropped, strict=True)]
            pad_before = tuple(w // 2 for w in widths)
            pad_after = tuple(w - w // 2 for w in widths)
            model_size = tuple(s + w for s, w in zip(cropped, widths, strict=True))
        return dataclasses.replace(
            mapping,
            crop_start=crop_start,
            crop_stop=crop_stop,
            resized=resized,
            pad_before=pad_before,
            pad_after=pad_after,
            model_size=tuple(int(s) for s in model_size),
        )

    def _foreground_box(
        self, resampled_size: tuple[int, int, int], margin: int
    ) -> tuple[list[int], list[int]] | None:
        """MONAI's bounding box of the windowed resampled volume's voxels > 0, slab by slab.

        Without resampling a windowed voxel is > 0 exactly when its HU value is above the
        window's low end (``x - low`` of two different floats is never 0), so the image's
        voxels are compared as they are; otherwise each slab is resampled and windowed.
        """
        in_plane = torch.zeros(resampled_size[:2], dtype=torch.bool, device=self.device)
        along_z = torch.zeros(resampled_size[2], dtype=torch.bool, device=self.device)
        exact_types = (np.int8, np.uint8, np.int16, np.float32)
        compare_source = not self._order and self._voxels.dtype.type in exact_types
        flips = [j for j in range(3) if self._pending_flips[j]]
        for r0 in range(0, resampled_size[2], self.slab_depth):
            r1 = min(r0 + self.slab_depth, resampled_size[2])
            box = [(0, resampled_size[0]), (0, resampled_size[1]), (r0, r1)]
            if compare_source:
                block, _ = self._source_block(box)
                plane_max, z_max = _max_projections(_as_tensor(block).to(self.device))
                plane_max = plane_max.flip([j for j in flips if j < 2]) if flips else plane_max
                z_max = z_max.flip(0) if 2 in flips else z_max
                low = self.prep.hu_window[0]
                in_plane |= plane_max > low
                along_z[r0:r1] = z_max > low
            else:
                plane_max, z_max = _max_projections(self._resampled(box))
                in_plane |= plane_max > 0
                along_z[r0:r1] = z_max > 0
        return _box_from_masks(in_plane, along_z, margin)

    def _model_slab(self, m0: int, m1: int) -> torch.Tensor:
        """(X', Y', m1 - m0) network input of model-grid z slices [m0, m1): the crop of the
        resampled slices, resized in-plane (2-D) or zero-padded (3-D)."""
        mapping = self.mapping
        c0, c1 = mapping.crop_start, mapping.crop_stop
        in_plane = [(c0[0], c1[0]), (c0[1], c1[1])]
        if mapping.resized is not None:  # 2-D: model z is cropped z
            x = self._resampled([*in_plane, (c0[2] + m0, c0[2] + m1)])
            if tuple(x.shape[:2]) == mapping.resized:
                return x
            slices = x.permute(2, 0, 1)[:, None]  # (Z, 1, X, Y)
            slices = F.interpolate(
                slices, size=mapping.resized, mode="bilinear", align_corners=False
            )
            return slices[:, 0].permute(1, 2, 0)
        # 3-D: model z m is cropped z m - pad_before; zeros around the crop
        z0 = min(max(m0 - mapping.pad_before[2], 0), mapping.cropped_size[2])
        z1 = min(max(m1 - mapping.pad_before[2], 0), mapping.cropped_size[2])
        if not any(mapping.pad_before) and not any(mapping.pad_after):
            return self._resampled([*in_plane, (c0[2] + z0, c0[2] + z1)])
        out = torch.zeros(
            (m1 - m0, *mapping.model_size[:2]), dtype=torch.float32, device=self.device
        ).permute(1, 2, 0)
        if z1 > z0:
            x = self._resampled([*in_plane, (c0[2] + z0, c0[2] + z1)])
            first = z0 + mapping.pad_before[2] - m0
            x_start, y_start = mapping.pad_before[:2]
            out[
                x_start : x_start + x.shape[0],
                y_start : y_start + x.shape[1],
                first : first + x.shape[2],
            ] = x
        return out


def preprocess(
    image: sitk.Image, prep: Preprocessing, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, GridMapping]:
    """CT -> network input (1, X', Y', Z') float32 on ``device``, equal to the output of
    ``build_transforms(prep)`` (to float32 rounding), and the mapping back (the whole volume
    of :class:`ModelInput`).

    Raises NotSeparableError for sheared voxel grids (use the MONAI transforms for those).
    """
    inputs = ModelInput(image, prep, device)
    return inputs.whole(), inputs.mapping
