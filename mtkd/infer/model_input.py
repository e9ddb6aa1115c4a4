"""Inference preprocessing with plain torch ops on the target device, slab by slab.

``preprocess`` gives the same (1, X, Y, Z) tensor as ``build_transforms(prep)`` (MONAI:
orientation to RAS, spacing, HU window, foreground crop, in-plane resize or patch padding)
without MetaTensors or grid_sample: the orientation is a permutation (a view) plus flips, and
resampling is separable linear interpolation (:mod:`mtkd.infer.separable`).

Large volumes are processed in slabs of axial (oriented z) slices, so that no full-resolution
float copy of the image is ever held: :class:`ModelInput` computes any range of the network
input's z slices from the image on demand (the foreground crop is found in a first pass over
slabs); its :class:`~mtkd.infer.grid_mapping.GridMapping` maps network output back. Every slab
is computed with the same operations on the same values as the whole volume, so the result
does not depend on the slab sizes.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from mtkd.data.preprocess import Preprocessing
from mtkd.errors import MTKDError
from mtkd.infer.grid_mapping import GridMapping
from mtkd.infer.memory import MAX_SLAB_BYTES
from mtkd.infer.model_grid import resampled_grid
from mtkd.infer.separable import AxisSampling, concat_z, resample_separable
from mtkd.infer.stages import stage
from mtkd.infer.transfers import to_device

_TORCH_DTYPES = (np.float32, np.float64, np.float16, np.int8, np.uint8, np.int16, np.int32)


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
        mapping = resampled_grid(image, prep)
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
        return (pieces[0] if len(pieces) == 1 else concat_z(pieces))[None]

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
        with stage("host to device"):
            x = to_device(_as_tensor(block), self.device)
        if self._order:
            same = [c is None for c in coords]
            with stage("resampling"):
                x = resample_separable(x[None], coords, same, self._order)[0]
            owned = True
        flip_axes = [j for j in range(3) if self._pending_flips[j]]
        if flip_axes:
            with stage("orientation"):
                x = x.flip(flip_axes)
            owned = True
        with stage("normalisation"):
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
            with stage("foreground crop"):
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
                plane_max, z_max = _max_projections(to_device(_as_tensor(block), self.device))
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
            with stage("resampling"):
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
