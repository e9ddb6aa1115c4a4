"""Inference preprocessing with plain torch ops on the target device, and its inverse.

``preprocess`` gives the same (1, X, Y, Z) tensor as ``build_transforms(prep)`` (MONAI:
orientation to RAS, spacing, HU window, foreground crop, in-plane resize or patch padding)
without MetaTensors or grid_sample: the orientation is a permutation (a view) plus flips, and
resampling is separable linear interpolation (one gather + lerp per axis, on MONAI's exact
sampling grid). The returned :class:`GridMapping` maps network output back onto the input
image's grid, chunk by chunk, as ``invert_to_original`` does.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from monai.data.utils import AFFINE_TOL, affine_to_spacing, compute_shape_offset, zoom_affine

from mtkd.data.preprocess import Preprocessing, sitk_affine_ras
from mtkd.errors import MTKDError

# Bytes of float32 work per chunk of the inverse mapping (several buffers of this size live).
DEFAULT_CHUNK_BYTES = 256 << 20
# Largest off-diagonal term of the voxel-to-voxel resampling matrix still taken as separable.
_SEPARABLE_TOL = 1e-6
_TORCH_DTYPES = (np.float32, np.float64, np.float16, np.int8, np.uint8, np.int16, np.int32)


class NotSeparableError(ValueError):
    """The spacing resample of this image is not per-axis (sheared voxel axes)."""


@dataclass(frozen=True)
class GridMapping:
    """What ``preprocess`` did, to map network output back onto the original grid.

    Oriented axis ``j`` is original axis ``permutation[j]``, reversed where ``flips[j]``.
    Resampled voxel ``o`` along axis ``j`` samples oriented coordinate
    ``scale[j] * o + offset[j]`` (identity when ``scale`` is None). ``crop_start``/``crop_stop``
    index the resampled grid; 2-D models resize the crop in-plane to ``resized``; 3-D models
    pad it by ``pad_before``/``pad_after`` to ``model_size``.
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

    def to_original(
        self,
        prediction: torch.Tensor,
        activation: str,
        n_labels: int = 255,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> np.ndarray:
        """Probabilities (C, *model_size) -> label map (X, Y, Z) on the original grid.

        Probabilities are resampled linearly (zeros outside the crop, as MONAI's inverse
        pads) in chunks along the original last axis, then argmax (or sigmoid > 0.5 for
        ``activation == "sigmoid"``) per chunk. The array is uint8 (int16 above 255 labels),
        a (X, Y, Z) view of a (Z, Y, X) C-ordered buffer, ready for ``to_sitk``.
        """
        if tuple(prediction.shape[1:]) != self.model_size:
            raise ValueError(f"prediction {tuple(prediction.shape)} is not on {self.model_size}")
        dtype = np.uint8 if n_labels <= 255 else np.int16
        torch_dtype = torch.uint8 if n_labels <= 255 else torch.int16
        x_size, y_size, z_size = self.original_size
        out = np.empty((z_size, y_size, x_size), dtype=dtype)
        axis = self.permutation.index(2)  # oriented axis holding the original last axis
        channels = prediction.shape[0]
        plane = int(np.prod(self.resampled_size)) // self.resampled_size[axis]
        plane = max(plane, int(np.prod(self.oriented_size)) // self.oriented_size[axis])
        step = max(1, chunk_bytes // max(1, 4 * channels * plane))
        inverse = [self.permutation.index(i) for i in range(3)]
        for k0 in range(0, z_size, step):
            k1 = min(z_size, k0 + step)
            if self.flips[axis]:
                o0, o1 = z_size - k1, z_size - k0
            else:
                o0, o1 = k0, k1
            probabilities = self._oriented_chunk(prediction, axis, o0, o1)
            labels = _labels(probabilities, activation)
            flipped = [j for j in range(3) if self.flips[j]]
            if flipped:
                labels = labels.flip(flipped)
            labels = labels.permute(inverse)  # (X, Y, k1 - k0)
            out[k0:k1] = labels.permute(2, 1, 0).to(torch_dtype).cpu().numpy()
        return out.transpose(2, 1, 0)

    # ------------------------------------------------------------------ inverse pieces
    def _oriented_chunk(self, prediction: torch.Tensor, axis: int, o0: int, o1: int):
        """Probabilities (C, *oriented_size) restricted to [o0, o1) along ``axis``."""
        if self.scale is None:
            return self._resampled_block(prediction, axis, o0, o1)
        same = [
            abs(self.scale[j] - 1.0) < 1e-12
            and abs(self.offset[j]) < 1e-12
            and self.resampled_size[j] == self.oriented_size[j]
            for j in range(3)
        ]
        if same[axis]:
            return _resample(self._resampled_block(prediction, axis, o0, o1), self._coords(), same)
        coords = self._coords()
        coords[axis] = coords[axis][o0:o1]
        lo = int(np.floor(float(coords[axis].min())))
        hi = min(int(np.floor(float(coords[axis].max()))) + 2, self.resampled_size[axis])
        coords[axis] = coords[axis] - lo
        return _resample(self._resampled_block(prediction, axis, lo, hi), coords, same)

    def _coords(self) -> list[torch.Tensor]:
        """Resampled-grid coordinates (float64) of every oriented voxel, per axis."""
        coords = []
        for j in range(3):
            positions = torch.arange(self.oriented_size[j], dtype=torch.float64)
            c = (positions - self.offset[j]) / self.scale[j]
            coords.append(c.clamp_(0.0, self.resampled_size[j] - 1.0))
        return coords

    def _resampled_block(self, prediction: torch.Tensor, axis: int, lo: int, hi: int):
        """(C, *resampled_size) restricted to [lo, hi) along ``axis``: zero outside the crop."""
        channels = prediction.shape[0]
        shape = list(self.resampled_size)
        shape[axis] = hi - lo
        start = list(self.crop_start)
        stop = list(self.crop_stop)
        inside_lo, inside_hi = max(lo, start[axis]), min(hi, stop[axis])
        full = [(0, s) for s in self.cropped_size]
        full[axis] = (inside_lo - start[axis], inside_hi - start[axis])
        if inside_hi <= inside_lo:
            return prediction.new_zeros((channels, *shape), dtype=torch.float32)
        cropped = self._cropped_block(prediction, full)
        if tuple(cropped.shape[1:]) == tuple(shape):
            return cropped
        block = prediction.new_zeros((channels, *shape), dtype=torch.float32)
        index = [slice(None)]
        for j in range(3):
            first = (inside_lo - lo) if j == axis else start[j]
            index.append(slice(first, first + cropped.shape[1 + j]))
        block[tuple(index)] = cropped
        return block

    def _cropped_block(self, prediction: torch.Tensor, ranges: list[tuple[int, int]]):
        """Cropped-grid probabilities (C, ...) of the index ``ranges``, from the model grid."""
        if self.resized is None:
            index = (slice(None),) + tuple(
                slice(b + a, b + c) for b, (a, c) in zip(self.pad_before, ranges, strict=True)
            )
            return prediction[index].float()
        # 2-D: undo the in-plane resize (torch's bilinear, align_corners=False); z unchanged
        same = [self.resized[j] == self.cropped_size[j] for j in range(2)] + [True]
        whole_planes = all(ranges[j] == (0, self.cropped_size[j]) for j in range(2))
        if whole_planes and not (same[0] and same[1]):  # torch's fused kernel, as MONAI
            planes = prediction[:, :, :, slice(*ranges[2])].permute(3, 0, 1, 2)  # (Z, C, X, Y)
            size = self.cropped_size[:2]
            planes = F.interpolate(planes.float(), size=size, mode="bilinear", align_corners=False)
            return planes.permute(1, 2, 3, 0)
        index = [slice(None)] + [slice(*r) if s else slice(None) for r, s in zip(ranges, same)]
        block = prediction[tuple(index)]
        coords = [
            None
            if same[j]
            else _half_pixel_coords(self.resized[j], self.cropped_size[j], *ranges[j])
            for j in range(2)
        ]
        return _resample(block, [*coords, None], same)


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


def _half_pixel_coords(source: int, target: int, start: int, stop: int) -> torch.Tensor:
    """Source coordinates of output voxels [start, stop) of a ``source -> target`` resize,
    as torch's linear ``interpolate(align_corners=False)`` computes them (in float32)."""
    scale = np.float32(source) / np.float32(target)
    positions = np.arange(start, stop, dtype=np.float32) + np.float32(0.5)
    coords = np.maximum(scale * positions - np.float32(0.5), np.float32(0.0))
    coords = np.minimum(coords, np.float32(source - 1))
    return torch.from_numpy(coords.astype(np.float64))


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


def _resample(x: torch.Tensor, coords: list[torch.Tensor | None], same: list[bool]) -> torch.Tensor:
    """Separable linear resampling of (C, *spatial) ``x``: spatial axis j is sampled at
    ``coords[j]`` unless ``same[j]``. The axis that shrinks most goes first.

    The work runs in ``x``'s memory order (outermost stride first), so every pass reads and
    writes memory sequentially; the result is a view in that layout.
    """
    order = [j for j in range(len(coords)) if not same[j]]
    if not order:
        return x.float()
    order.sort(key=lambda j: len(coords[j]) / x.shape[1 + j])
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


def _foreground_box(x: torch.Tensor, margin: int) -> tuple[list[int], list[int]] | None:
    """MONAI's bounding box of ``x > 0`` (X, Y, Z) with ``margin``, clipped to the image."""
    in_plane = x.amax(dim=2) > 0  # (X, Y)
    along = [in_plane.any(dim=1), in_plane.any(dim=0), x.amax(dim=(0, 1)) > 0]
    start, stop = [], []
    for size, mask in zip(x.shape, along, strict=True):
        where = torch.nonzero(mask).flatten().cpu()
        if where.numel() == 0:
            return None
        start.append(max(int(where[0]) - margin, 0))
        stop.append(min(int(where[-1]) + margin + 1, size))
    return start, stop


def _source_tensor(image: sitk.Image, device: torch.device) -> torch.Tensor:
    """The image's voxels as a (X, Y, Z) tensor on ``device``: a view of the SimpleITK
    buffer on the CPU (the caller keeps ``image`` alive), one host-to-device copy otherwise."""
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        raise MTKDError(
            f"expected a 3-D scalar image, got {image.GetDimension()}-D with "
            f"{image.GetNumberOfComponentsPerPixel()} components per voxel"
        )
    array = sitk.GetArrayViewFromImage(image)  # (Z, Y, X), read-only
    if array.dtype.type not in _TORCH_DTYPES:
        array = array.astype(np.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(array)
    if device.type != "cpu":
        tensor = tensor.to(device)
    return tensor.permute(2, 1, 0)


def preprocess(
    image: sitk.Image, prep: Preprocessing, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, GridMapping]:
    """CT -> network input (1, X', Y', Z') float32 on ``device``, equal to the output of
    ``build_transforms(prep)`` (to float32 rounding), and the mapping back.

    Raises NotSeparableError for sheared voxel grids (use the MONAI transforms for those).
    """
    device = torch.device(device)
    original_size = tuple(int(s) for s in image.GetSize())
    permutation, flips, oriented_affine = orientation_to_ras(sitk_affine_ras(image), original_size)
    oriented_size = tuple(original_size[i] for i in permutation)
    grid = None
    if prep.spacing is not None:
        grid = spacing_grid(oriented_affine, oriented_size, prep.spacing)

    x = _source_tensor(image, device).permute(permutation)  # a view, still unflipped
    owned = device.type != "cpu"
    pending_flips = list(flips)
    if grid is None:
        resampled_size, scale, offset = oriented_size, None, None
    else:
        resampled_size, scale, offset = grid
        coords = []
        same = []
        for j in range(3):
            positions = torch.arange(resampled_size[j], dtype=torch.float64)
            exact = abs(scale[j] - 1) < 1e-12 and abs(offset[j]) < 1e-12
            same.append(exact and resampled_size[j] == oriented_size[j])
            c = (positions * float(scale[j]) + float(offset[j])).clamp_(0, oriented_size[j] - 1)
            if flips[j] and not same[j]:
                c = (oriented_size[j] - 1) - c  # the flip folded into the gather
                pending_flips[j] = False
            coords.append(c)
        if not all(same):
            x = _resample(x[None], coords, same)[0]
            owned = True
        scale = tuple(float(s) for s in scale)
        offset = tuple(float(o) for o in offset)
    flip_axes = [j for j in range(3) if pending_flips[j]]
    if flip_axes:
        x = x.flip(flip_axes)
        owned = True
    if x.dtype != torch.float32:
        x = x.float()
        owned = True

    low, high = prep.hu_window
    if owned:
        x.sub_(low).div_(high - low)
    else:
        x = (x - low) / (high - low)  # never write into (or alias) the image's buffer
    x.clamp_(0.0, 1.0)

    crop_start, crop_stop = (0, 0, 0), tuple(x.shape)
    if prep.crop_foreground:
        box = _foreground_box(x, margin=2)
        if box is not None:  # MONAI would crop an empty image to nothing; keep it whole
            crop_start, crop_stop = tuple(box[0]), tuple(box[1])
            x = x[tuple(slice(a, b) for a, b in zip(crop_start, crop_stop, strict=True))]

    resized = None
    pad_before = pad_after = (0, 0, 0)
    if prep.dims == 2:
        target = tuple(int(s) for s in prep.slice_size)
        if tuple(x.shape[:2]) != target:
            slices = x.permute(2, 0, 1)[:, None]  # (Z, 1, X, Y)
            slices = F.interpolate(slices, size=target, mode="bilinear", align_corners=False)
            x = slices[:, 0].permute(1, 2, 0)
        resized = target
    else:
        widths = [max(p - s, 0) for p, s in zip(prep.patch_size, x.shape, strict=True)]
        pad_before = tuple(w // 2 for w in widths)
        pad_after = tuple(w - w // 2 for w in widths)
        if any(widths):
            pads = [p for j in (2, 1, 0) for p in (pad_before[j], pad_after[j])]
            x = F.pad(x[None], pads)[0]
    mapping = GridMapping(
        original_size=original_size,
        permutation=permutation,
        flips=flips,
        oriented_size=oriented_size,
        resampled_size=tuple(int(s) for s in resampled_size),
        scale=scale,
        offset=offset,
        crop_start=crop_start,
        crop_stop=crop_stop,
        resized=resized,
        pad_before=pad_before,
        pad_after=pad_after,
        model_size=tuple(int(s) for s in x.shape),
    )
    return x[None], mapping
