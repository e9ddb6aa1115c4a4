"""CT preprocessing with MONAI transforms, and its exact inverse.

A SimpleITK image becomes a MONAI ``MetaTensor`` of shape (1, X, Y, Z) whose affine maps
voxel indices to RAS millimetres; MONAI's deterministic transforms (orientation, spacing,
HU window, foreground crop, in-plane resize) bring it to the network's grid, and
``invert_to_original`` maps a prediction made on that grid back onto the original image
grid (same size, spacing, origin and direction as the input).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    Invertd,
    Orientationd,
    Resized,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from mtkd.config import DataConfig

# LPS (ITK) <-> RAS (MONAI, NIfTI) flips the first two world axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Preprocessing:
    """The settings that turn a CT into network input; stored with every exported model."""

    dims: int
    hu_window: tuple[float, float]
    spacing: tuple[float, float, float] | None
    crop_foreground: bool
    slice_size: tuple[int, int]
    patch_size: tuple[int, int, int]
    in_channels: int

    @classmethod
    def from_config(cls, data: DataConfig) -> Preprocessing:
        return cls(
            dims=int(data.dims),
            hu_window=(float(data.hu_window[0]), float(data.hu_window[1])),
            spacing=None if data.spacing is None else tuple(float(s) for s in data.spacing),
            crop_foreground=bool(data.crop_foreground),
            slice_size=tuple(int(s) for s in data.slice_size),
            patch_size=tuple(int(s) for s in data.patch_size),
            in_channels=int(data.in_channels),
        )

    def to_dict(self) -> dict:
        return {
            "dims": self.dims,
            "hu_window": list(self.hu_window),
            "spacing": None if self.spacing is None else list(self.spacing),
            "crop_foreground": self.crop_foreground,
            "slice_size": list(self.slice_size),
            "patch_size": list(self.patch_size),
            "in_channels": self.in_channels,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        return cls(
            dims=int(data["dims"]),
            hu_window=tuple(data["hu_window"]),
            spacing=None if data.get("spacing") is None else tuple(data["spacing"]),
            crop_foreground=bool(data["crop_foreground"]),
            slice_size=tuple(data["slice_size"]),
            patch_size=tuple(data["patch_size"]),
            in_channels=int(data.get("in_channels", 1)),
        )


def sitk_affine_ras(image: sitk.Image) -> np.ndarray:
    """4x4 affine mapping (i, j, k) voxel indices of ``image`` to RAS millimetres."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)
    affine[:3, 3] = image.GetOrigin()
    return _LPS_TO_RAS @ affine


def to_metatensor(image: sitk.Image, dtype: torch.dtype = torch.float32) -> MetaTensor:
    """SimpleITK image -> MetaTensor (1, X, Y, Z) with its RAS affine (no resampling)."""
    array = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)
    tensor = torch.as_tensor(np.ascontiguousarray(array)).to(dtype)[None]
    return MetaTensor(tensor, affine=torch.as_tensor(sitk_affine_ras(image)))


def to_sitk(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Array (X, Y, Z) on ``reference``'s grid -> SimpleITK image with its geometry."""
    if tuple(array.shape) != tuple(reference.GetSize()):
        raise ValueError(f"array shape {array.shape} is not the grid {reference.GetSize()}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.CopyInformation(reference)
    return image


def build_transforms(
    prep: Preprocessing, with_label: bool, extra: Mapping[str, str] | None = None
) -> Compose:
    """Deterministic, invertible preprocessing of {"image", "label"?, ...} dicts of (C, X, Y, Z).

    Orientation to RAS; optional resampling to ``spacing``; HU window to 0..1 (image only);
    optional crop to the body; for 2-D models an in-plane resize to ``slice_size``, for 3-D
    models padding up to ``patch_size``. ``extra`` maps further keys (e.g. a stored teacher
    map) to their interpolation mode ("nearest" or "bilinear"); they follow every spatial step.
    """
    keys = ["image", "label"] if with_label else ["image"]
    modes = ["bilinear", "nearest"] if with_label else ["bilinear"]
    for key, mode in (extra or {}).items():
        keys.append(key)
        modes.append(mode)
    low, high = prep.hu_window
    steps: list = [
        Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))
    ]
    if prep.spacing is not None:
        steps.append(Spacingd(keys=keys, pixdim=prep.spacing, mode=modes))
    steps.append(
        ScaleIntensityRanged(keys="image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
    )
    if prep.crop_foreground:
        steps.append(
            CropForegroundd(
                keys=keys, source_key="image", select_fn=_body, margin=2, allow_smaller=True
            )
        )
    if prep.dims == 2:
        size = (*prep.slice_size, -1)
        steps.append(Resized(keys=keys, spatial_size=size, mode=modes))
    else:
        steps.append(SpatialPadd(keys=keys, spatial_size=prep.patch_size))
    return Compose(steps)


def _body(image: torch.Tensor) -> torch.Tensor:
    """Foreground for cropping: voxels above the lower window bound (air is 0 after windowing)."""
    return image > 0.0


def invert_to_original(
    prediction: torch.Tensor, preprocessed_image: MetaTensor, transforms: Compose, nearest: bool
) -> torch.Tensor:
    """Map ``prediction`` (C, *preprocessed spatial) back onto the original grid (C, X, Y, Z).

    ``preprocessed_image`` is the output of ``transforms`` for the same case (it carries the
    applied operations); ``nearest`` for label maps, linear interpolation for probabilities.
    """
    pred = MetaTensor(prediction, affine=preprocessed_image.affine)
    pred.applied_operations = list(preprocessed_image.applied_operations)
    inverter = Invertd(
        keys="pred",
        transform=transforms,
        orig_keys="image",
        nearest_interp=nearest,
        to_tensor=True,
    )
    out = inverter({"pred": pred, "image": preprocessed_image})["pred"]
    return out.as_tensor() if isinstance(out, MetaTensor) else out
