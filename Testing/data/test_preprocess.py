"""CT preprocessing with MONAI transforms and the exact inverse mapping onto the input grid."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from mtkd.config import DataConfig
from mtkd.data.ct_check import ct_intensity_warning
from mtkd.data.preprocess import (
    Preprocessing,
    build_transforms,
    invert_to_original,
    sitk_affine_ras,
    to_metatensor,
    to_sitk,
)


def oblique(image: sitk.Image) -> sitk.Image:
    """The same voxels with a rotated, axis-permuted direction and a shifted origin."""
    permute = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=float)
    angle = 0.3
    rotate = np.array(
        [[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]]
    )
    out = sitk.Image(image)
    out.SetDirection((rotate @ permute).flatten().tolist())
    out.SetOrigin((12.5, -40.0, 7.0))
    return out


@pytest.fixture(scope="module")
def ct_and_label(data_dir):
    image = sitk.ReadImage(str(data_dir / "abdomen_ct.nii.gz"), sitk.sitkFloat32)
    label = sitk.ReadImage(str(data_dir / "abdomen_seg_total_fast.nii.gz"))
    crop = ([100, 90, 40], [10, 5, 66])  # size, index: a small block around the kidneys
    image = sitk.RegionOfInterest(image, crop[0], crop[1])
    label = sitk.RegionOfInterest(label, crop[0], crop[1])
    return oblique(image), oblique(label)


def test_affine_matches_nibabel(data_dir):
    path = data_dir / "abdomen_ct.nii.gz"
    image = sitk.ReadImage(str(path))
    np.testing.assert_allclose(sitk_affine_ras(image), nib.load(path).affine, atol=1e-4)


def prep_for(**fields) -> Preprocessing:
    return Preprocessing.from_config(DataConfig(**fields))


def round_trip(image, label, prep):
    transforms = build_transforms(prep, with_label=True)
    data = transforms({"image": to_metatensor(image), "label": to_metatensor(label)})
    back = invert_to_original(data["label"].as_tensor(), data["image"], transforms, nearest=True)
    return data, to_sitk(back[0].numpy().round().astype(np.uint8), image)


def test_inverse_is_exact_without_resampling(ct_and_label):
    image, label = ct_and_label
    data, back = round_trip(image, label, prep_for(dims=3, patch_size=[96, 96, 96]))
    assert data["image"].shape[1:] != tuple(image.GetSize())  # cropped/padded/reoriented
    assert back.GetSize() == label.GetSize()
    assert back.GetDirection() == label.GetDirection()
    assert back.GetOrigin() == label.GetOrigin()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(label))


@pytest.mark.parametrize(
    "fields",
    [
        {"dims": 3, "spacing": [4.0, 4.0, 4.0], "patch_size": [32, 32, 32]},
        {"dims": 2, "slice_size": [64, 64]},
        {"dims": 2, "spacing": [2.0, 2.0, -1.0], "slice_size": [96, 96]},
    ],
)
def test_inverse_after_resampling_lands_on_the_original_grid(ct_and_label, fields):
    image, label = ct_and_label
    data, back = round_trip(image, label, prep_for(**fields))
    assert back.GetSize() == label.GetSize()
    assert back.GetSpacing() == label.GetSpacing()
    original = sitk.GetArrayFromImage(label)
    restored = sitk.GetArrayFromImage(back)
    kidney = original == 2
    overlap = 2 * (kidney & (restored == 2)).sum() / (kidney.sum() + (restored == 2).sum())
    assert overlap > 0.8  # interpolation loses a little; a misplaced or flipped map loses all


def test_window_scales_to_unit_range(ct_and_label):
    image, label = ct_and_label
    prep = prep_for(dims=3, hu_window=[-100.0, 100.0], crop_foreground=False, patch_size=[8, 8, 8])
    data = build_transforms(prep, with_label=False)({"image": to_metatensor(image)})
    values = data["image"].as_tensor()
    assert float(values.min()) == 0.0 and float(values.max()) == 1.0
    raw = sitk.GetArrayFromImage(image)
    inside = ((raw > -100) & (raw < 100)).mean()
    assert abs(float(((values > 0) & (values < 1)).float().mean()) - inside) < 1e-3


# ---------------------------------------------------------------- the HU plausibility check


@pytest.fixture(scope="module")
def abdomen(data_dir) -> sitk.Image:
    return sitk.ReadImage(str(data_dir / "abdomen_ct.nii.gz"))


def test_air_only_crop_of_a_real_ct_is_called_air(abdomen, tmp_path):
    """The rows of the real CT in front of the body hold only air (noisy, -1024..-947 HU):
    said to hold only air (the old check passed it silently as a plausible CT)."""
    air = abdomen[:, 98:, :]
    assert sitk.GetArrayViewFromImage(air).max() < -900
    warning = ct_intensity_warning(air, tmp_path / "air.nii.gz")
    assert warning is not None and str(tmp_path / "air.nii.gz") in warning
    assert "only air" in warning and "normalised" not in warning


@pytest.mark.parametrize("value", [-1000.0, -1024.0, -3024.0])
def test_constant_air_is_called_air_not_normalised(abdomen, tmp_path, value):
    """An image filled with air (the old check said "look normalised")."""
    air = sitk.Image(abdomen.GetSize(), sitk.sitkInt16) + int(value)
    air.CopyInformation(abdomen)
    warning = ct_intensity_warning(air, tmp_path / "air.nii.gz")
    assert warning is not None and "only air" in warning and "normalised" not in warning


@pytest.mark.parametrize("value", [0.0, 40.0, 1.0])
def test_constant_image_is_called_constant(abdomen, tmp_path, value):
    blank = sitk.Image(abdomen.GetSize(), sitk.sitkFloat32) + value
    warning = ct_intensity_warning(blank, tmp_path / "blank.nii.gz")
    assert warning is not None and str(tmp_path / "blank.nii.gz") in warning
    assert "same intensity" in warning and f"{value:.4g}" in warning
    assert "normalised" not in warning


@pytest.mark.parametrize(
    "crop",
    [
        "whole",  # abdomen: air, fat, soft tissue, bone, contrast
        "body_surface",  # the last rows of the body and the air in front: mostly air
        "inside_body",  # a block inside the body: no air
        "spine",  # the oblique lumbar crop (no air at all, fat present)
    ],
)
def test_real_ct_crops_are_not_flagged(abdomen, data_dir, crop):
    image = {
        "whole": lambda: abdomen,
        "body_surface": lambda: abdomen[:, 94:, :],
        "inside_body": lambda: abdomen[40:80, 30:70, 30:70],
        "spine": lambda: sitk.ReadImage(str(data_dir / "spine_ct.nii.gz")),
    }[crop]()
    assert ct_intensity_warning(image) is None


def test_normalised_image_is_still_called_normalised(abdomen):
    unit = sitk.RescaleIntensity(sitk.Cast(abdomen, sitk.sitkFloat32), 0.0, 1.0)
    warning = ct_intensity_warning(unit)
    assert warning is not None and "normalised" in warning
