"""CT preprocessing with MONAI transforms and the exact inverse mapping onto the input grid."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from mtkd.config import DataConfig
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
