"""The model grid's orientation and spacing: MONAI's ``Orientation("RAS")`` as a permutation
plus flips, and its ``Spacing`` resample as a per-axis scale and offset (when separable).
"""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from monai.data.utils import AFFINE_TOL, affine_to_spacing, compute_shape_offset, zoom_affine

from mtkd.data.headers import MAX_VOXELS
from mtkd.data.preprocess import Preprocessing, sitk_affine_ras
from mtkd.errors import MTKDError
from mtkd.infer.grid_mapping import GridMapping

# Largest off-diagonal term of the voxel-to-voxel resampling matrix still taken as separable.
_SEPARABLE_TOL = 1e-6


class NotSeparableError(ValueError):
    """The spacing resample of this image is not per-axis (sheared voxel axes)."""


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


def resampled_grid(image: sitk.Image, prep: Preprocessing) -> GridMapping:
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
