"""Fast inference: torch preprocessing equal to the MONAI transforms, the chunked inverse equal
to ``invert_to_original``, memory plans, CPU threads, peak memory and the CT intensity check."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import expect_error
from torch import nn

from mtkd.data.ct_check import ct_intensity_warning
from mtkd.data.labels import LabelTable
from mtkd.data.preprocess import (
    Preprocessing,
    build_transforms,
    invert_to_original,
    to_metatensor,
)
from mtkd.infer.inference import predict_volume, probabilities_to_labels
from mtkd.infer.memory import (
    FALLBACK_BYTES_PER_VOXEL,
    PeakMemory,
    activation_bytes_per_voxel,
    cfs_quota,
    cgroup_memory_room,
    configure_cpu_threads,
    cpu_max_quota,
    has_extent_dependent_norm,
    meminfo_available,
    plan_inference,
    usable_cpus,
)
from mtkd.infer.model_grid import NotSeparableError
from mtkd.infer.model_input import preprocess
from mtkd.infer.predictor import Predictor
from mtkd.modelfiles.model_io import LoadedModel
from mtkd.models import build_network

LABELS = LabelTable({1: "liver", 2: "spleen", 3: "kidney_right"})


def reoriented(image: sitk.Image, direction: np.ndarray) -> sitk.Image:
    out = sitk.Image(image)
    out.SetDirection(direction.flatten().tolist())
    out.SetOrigin((12.5, -40.0, 7.0))
    return out


def rotated(image: sitk.Image) -> sitk.Image:
    """Axis-permuted and rotated by 0.3 rad in-plane (as in test_preprocess.oblique)."""
    permute = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=float)
    c, s = math.cos(0.3), math.sin(0.3)
    return reoriented(image, np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ permute)


def flipped(image: sitk.Image) -> sitk.Image:
    """Axis-permuted with two axes reversed: orientation needs flips and a transpose."""
    return reoriented(image, np.array([[0, -1, 0], [0, 0, -1], [1, 0, 0]], dtype=float))


@pytest.fixture(scope="module")
def ct(data_dir) -> sitk.Image:
    return sitk.ReadImage(str(data_dir / "abdomen_ct.nii.gz"))


@pytest.fixture(scope="module")
def images(ct) -> dict[str, sitk.Image]:
    return {"ct": ct, "rotated": rotated(ct), "flipped": flipped(ct)}


def make_prep(dims: int, spacing=None, crop: bool = True, **fields) -> Preprocessing:
    return Preprocessing(
        dims=dims,
        hu_window=(-160.0, 240.0),
        spacing=spacing,
        crop_foreground=crop,
        slice_size=fields.get("slice_size", (64, 48)),
        patch_size=fields.get("patch_size", (96, 96, 128)),
        in_channels=fields.get("in_channels", 1),
    )


PREPS = {
    "2d": make_prep(2),
    "2d-spacing-nocrop": make_prep(2, (4.5, 4.5, 6.0), crop=False),
    "2d-inplane-spacing": make_prep(2, (2.5, 2.5, -1.0)),
    "3d-nocrop": make_prep(3, crop=False),
    "3d-spacing": make_prep(3, (4.5, 4.5, 6.0)),
}


CASES = [("ct", name) for name in PREPS] + [("rotated", name) for name in PREPS]
CASES += [("flipped", name) for name in ("2d", "2d-spacing-nocrop", "3d-spacing")]


@pytest.mark.parametrize(("image_name", "prep_name"), CASES)
def test_fast_preprocessing_and_inverse_equal_monai(images, image_name, prep_name):
    image, prep = images[image_name], PREPS[prep_name]
    transforms = build_transforms(prep, with_label=False)
    expected = transforms({"image": to_metatensor(image)})["image"]
    volume, mapping = preprocess(image, prep)
    assert tuple(volume.shape) == tuple(expected.shape)
    assert float((volume - expected.as_tensor()).abs().max()) < 1e-4

    # random (voxel-wise independent) probabilities are the hardest case for the inverse
    generator = torch.Generator().manual_seed(7)
    logits = 3 * torch.randn((4, *volume.shape[1:]), generator=generator)
    probabilities = torch.softmax(logits, dim=0)
    back = invert_to_original(probabilities, expected, transforms, nearest=False)
    reference = probabilities_to_labels(back, "softmax").numpy()
    untouched = probabilities.clone()
    labels = mapping.to_original(probabilities, "softmax", chunk_bytes=4 << 20)  # some chunks
    assert torch.equal(probabilities, untouched)
    assert labels.shape == tuple(image.GetSize()) and labels.dtype == np.uint8
    assert_same_labels(labels, reference, back)
    # the labels kept as a torch tensor on a device (a GPU's, for post-processing there)
    on_device = mapping.to_original(
        probabilities, "softmax", chunk_bytes=4 << 20, device=torch.device("cpu")
    )
    assert isinstance(on_device, torch.Tensor) and on_device.dtype == torch.uint8
    np.testing.assert_array_equal(on_device.numpy(), labels)
    if prep_name == "3d-spacing":
        sigmoid = torch.sigmoid(logits[:1])
        back = invert_to_original(sigmoid, expected, transforms, nearest=False)
        reference = probabilities_to_labels(back, "sigmoid").numpy()
        np.testing.assert_array_equal(mapping.to_original(sigmoid, "sigmoid"), reference)


def assert_same_labels(labels: np.ndarray, reference: np.ndarray, back: torch.Tensor) -> None:
    """Equal label maps, except where the two best MONAI probabilities tie to float rounding
    (the torch path interpolates in another order: ~1e-7 differences can flip a tie)."""
    differ = labels != reference
    if differ.any():
        best_two = back.topk(2, dim=0).values.numpy()
        margin = best_two[0] - best_two[1]
        assert margin[differ].max() < 1e-5, margin[differ].max()
        assert differ.mean() < 1e-3, differ.sum()


def test_upsampling_and_many_labels(ct):
    """Finer spacing than the image (upsampling) and int16 output above 255 labels."""
    image = sitk.RegionOfInterest(ct, [60, 50, 30], [30, 25, 60])
    prep = make_prep(3, (2.0, 1.5, 2.5), patch_size=(32, 32, 32))
    transforms = build_transforms(prep, with_label=False)
    expected = transforms({"image": to_metatensor(image)})["image"]
    volume, mapping = preprocess(image, prep)
    assert tuple(volume.shape) == tuple(expected.shape)
    assert float((volume - expected.as_tensor()).abs().max()) < 1e-4
    probabilities = torch.softmax(torch.randn((3, *volume.shape[1:])), dim=0)
    back = invert_to_original(probabilities, expected, transforms, nearest=False)
    labels = mapping.to_original(probabilities, "softmax", n_labels=300)
    assert labels.dtype == np.int16
    on_device = mapping.to_original(probabilities, "softmax", n_labels=300, device="cpu")
    np.testing.assert_array_equal(on_device.numpy(), labels)
    assert_same_labels(labels, probabilities_to_labels(back, "softmax").numpy(), back)


def test_preprocessing_never_aliases_the_image(ct):
    image = sitk.Cast(ct, sitk.sitkFloat32)  # float32 on the CPU: the source is a view
    volume, _ = preprocess(image, make_prep(3, crop=False, patch_size=(8, 8, 8)))
    before = sitk.GetArrayFromImage(image)
    volume.fill_(5.0)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), before)


def test_sheared_grid_is_refused_by_the_torch_path(ct):
    image = sitk.Image(ct)
    image.SetDirection((1.0, 0.2, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    with pytest.raises(NotSeparableError):
        preprocess(image, make_prep(3, (4.0, 4.0, 4.0)))


# ---------------------------------------------------------------------- predictor
def tiny_model(dims: int, prep: Preprocessing, in_channels: int | None = None) -> LoadedModel:
    torch.manual_seed(0)
    channels = prep.in_channels if in_channels is None else in_channels
    if dims == 2:
        network = build_network(
            "thesis_unet",
            spatial_dims=2,
            in_channels=channels,
            out_channels=4,
            channels=[4, 8],
            bottleneck=16,
        )
    else:
        network = build_network(
            "unet",
            spatial_dims=3,
            in_channels=channels,
            out_channels=4,
            channels=[4, 8, 16],
            strides=[2, 2],
            num_res_units=1,
            norm="BATCH",  # instance norm would make the plan use windows (see below)
        )
    return LoadedModel(network, LABELS, prep, "softmax", {}, Path("/models/tiny"), 4)


def calibrate(model: LoadedModel, image: sitk.Image) -> LoadedModel:
    """Batch-norm statistics of the real CT, so that a random network's output varies."""
    volume, _ = preprocess(image, model.prep)
    for module in model.network.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative: one pass sets the statistics
    model.network.train()
    with torch.no_grad():
        model.network(volume.permute(3, 0, 1, 2))
    model.network.eval()
    return model


def monai_pipeline(model: LoadedModel, image: sitk.Image) -> np.ndarray:
    """The reference: MONAI transforms, ``predict_volume`` and ``invert_to_original``."""
    transforms = build_transforms(model.prep, with_label=False)
    data = transforms({"image": to_metatensor(image)})["image"]
    probabilities = predict_volume(
        model.network, data.as_tensor(), model.prep, "softmax", torch.device("cpu"), 16, 4
    )
    back = invert_to_original(probabilities, data, transforms, nearest=False)
    return probabilities_to_labels(back, "softmax").numpy().transpose(2, 1, 0)


def assert_on_grid(labelmap: sitk.Image, image: sitk.Image) -> None:
    assert labelmap.GetSize() == image.GetSize()
    assert labelmap.GetSpacing() == image.GetSpacing()
    assert labelmap.GetOrigin() == image.GetOrigin()
    assert labelmap.GetDirection() == image.GetDirection()


def test_2d_predictor_equals_the_monai_pipeline(images):
    image = images["flipped"]
    model = calibrate(tiny_model(2, make_prep(2, slice_size=(64, 64))), image)
    prediction = Predictor(model).predict(image)
    assert_on_grid(prediction.labelmap, image)
    assert prediction.plan.startswith("2-D slices 64x64")
    assert prediction.seconds > 0 and prediction.peak_memory_bytes >= 0
    labels = sitk.GetArrayViewFromImage(prediction.labelmap)
    assert labels.max() > 0  # not all background: a meaningful comparison
    agree = (labels == monai_pipeline(model, image)).mean()
    assert agree > 0.999


def test_plan_follows_the_memory_budget(images):
    image = images["rotated"]
    prep = make_prep(3, (4.5, 4.5, 6.0), patch_size=(32, 32, 32))
    model = tiny_model(3, prep)
    volume, _ = preprocess(image, prep)
    per_voxel = activation_bytes_per_voxel(model.network, 1, 3, 4, "cpu")
    assert 0 < per_voxel < FALLBACK_BYTES_PER_VOXEL

    big = Predictor(model, memory_budget_bytes=1 << 40).plan(tuple(volume.shape[1:]))
    padded = [-(-s // 4) * 4 for s in volume.shape[1:]]
    assert big.mode == "whole"
    assert big.describe() == "whole volume 1x1x" + "x".join(map(str, padded))
    budget = int(per_voxel * 32**3 * 5.5)
    assert per_voxel * math.prod(padded) > budget  # the volume does not fit: windows
    medium = Predictor(model, memory_budget_bytes=budget).plan(tuple(volume.shape[1:]))
    assert (medium.mode, medium.batch) == ("sliding", 5)
    assert medium.describe() == "sliding window 32x32x32, 5 windows per batch"

    whole = Predictor(model, memory_budget_bytes=1 << 40).predict(image)
    assert whole.plan.startswith("whole volume")
    assert_on_grid(whole.labelmap, image)
    sliding = Predictor(model, memory_budget_bytes=1).predict(image)
    assert sliding.plan == "sliding window 32x32x32, 1 windows per batch"
    assert_on_grid(sliding.labelmap, image)
    labels = sitk.GetArrayViewFromImage(sliding.labelmap)
    assert set(np.unique(labels)) <= {0, 1, 2, 3} and labels.max() > 0
    # sliding windows as the MONAI pipeline runs them (the volume is larger than a patch)
    assert (labels == monai_pipeline(model, image)).mean() > 0.999


UNET_3D = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 4,
    "channels": [4, 8, 16],
    "strides": [2, 2],
    "num_res_units": 1,
}


def test_instance_norm_networks_run_on_their_training_windows(images):
    """Instance/group norm statistics depend on the input's extent: such networks are run on
    windows of the patch size they were trained on, whatever the memory budget."""
    prep = make_prep(3, (4.5, 4.5, 6.0), patch_size=(32, 32, 32))
    instance = build_network("unet", **UNET_3D).eval()  # MONAI's default: instance norm
    batch = build_network("unet", **UNET_3D, norm="BATCH").eval()
    assert has_extent_dependent_norm(instance) and not has_extent_dependent_norm(batch)
    example = torch.zeros(1, 1, 32, 32, 32)
    assert has_extent_dependent_norm(torch.jit.trace(instance, example))
    assert not has_extent_dependent_norm(torch.jit.trace(batch, example))
    spec = {"name": "unet", "params": UNET_3D, "reconstruction": "none"}
    assert has_extent_dependent_norm(object(), spec)
    batch_spec = {**spec, "params": {**UNET_3D, "norm": "BATCH"}}
    assert not has_extent_dependent_norm(object(), batch_spec)
    assert has_extent_dependent_norm(object())  # unknown: windows, as trained

    volume, _ = preprocess(images["rotated"], prep)
    model = LoadedModel(instance, LABELS, prep, "softmax", {}, Path("/models/in"), 4)
    plan = Predictor(model, memory_budget_bytes=1 << 40).plan(tuple(volume.shape[1:]))
    assert (plan.mode, plan.batch) == ("sliding", 64)


def test_window_and_slice_batches_are_clamped():
    prep3, prep2 = make_prep(3, patch_size=(32, 32, 32)), make_prep(2, slice_size=(64, 64))
    shape = (1000, 1000, 1000)  # never whole at these budgets
    assert plan_inference(shape, prep3, 100.0, 100 * 32**3 * 1000).batch == 64
    assert plan_inference(shape, prep3, 100.0, 100 * 32**3 * 7 + 5).batch == 7
    assert plan_inference(shape, prep3, 100.0, 10).batch == 1
    assert plan_inference((64, 64, 500), prep2, 10.0, 10 * 64 * 64 * 1000).batch == 256
    assert plan_inference((64, 64, 500), prep2, 10.0, 10 * 64 * 64 * 9).batch == 9
    assert plan_inference((64, 64, 30), prep2, 10.0, 10 * 64 * 64 * 100).batch == 30  # depth
    cache_sized = plan_inference((64, 64, 500), prep2, 10.0, 1 << 40, 1, 10 * 64 * 64 * 3)
    assert cache_sized.batch == 3


def test_channel_and_dimension_mismatch_name_the_model(ct):
    three = tiny_model(2, make_prep(2, slice_size=(32, 32)), in_channels=3)
    with expect_error("/models/tiny", "3 input channels", "gives 1"):
        Predictor(three)
    wrong_dims = tiny_model(3, make_prep(2, slice_size=(32, 32)))
    with expect_error("/models/tiny", "3-D"):
        Predictor(wrong_dims)


def test_sheared_image_falls_back_to_monai(ct):
    image = sitk.RegionOfInterest(ct, [40, 40, 30], [40, 30, 60])
    image.SetDirection((1.0, 0.2, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    model = tiny_model(3, make_prep(3, (6.0, 6.0, 6.0), patch_size=(16, 16, 16)))
    prediction = Predictor(model).predict(image)
    assert prediction.plan.endswith("(MONAI resampling)")
    assert_on_grid(prediction.labelmap, image)


# ---------------------------------------------------------------------- memory, threads
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_activation_bytes_are_measured_with_hooks():
    network = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
    # input 1 channel + conv output 4 + relu output 4, float32: 36 bytes per pixel
    assert activation_bytes_per_voxel(network, 1, 2, 8, "cpu") == pytest.approx(36.0)
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1)))
    assert activation_bytes_per_voxel(scripted, 1, 2, 8, "cpu") == FALLBACK_BYTES_PER_VOXEL
    calls = []

    def plain(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape)
        return x

    assert activation_bytes_per_voxel(plain, 1, 3, 8, "cpu") == FALLBACK_BYTES_PER_VOXEL
    assert not calls  # a callable without hooks is never probed


def test_cgroup_and_meminfo_parsing():
    assert cpu_max_quota("max 100000") is None
    assert cpu_max_quota("200000 100000\n") == 2.0
    assert cpu_max_quota("150000 100000") == 1.5
    assert cpu_max_quota("garbage") is None
    assert cfs_quota("-1", "100000") is None
    assert cfs_quota("400000\n", "100000\n") == 4.0
    assert usable_cpus(16, 2.0) == 2
    assert usable_cpus(16, 1.5) == 1
    assert usable_cpus(2, 8.0) == 2
    assert usable_cpus(4, 0.5) == 1
    assert usable_cpus(6, None) == 6
    assert cgroup_memory_room("max\n", "123") is None
    assert cgroup_memory_room("1000", "300") == 700
    assert cgroup_memory_room("9223372036854771712", "5") is None  # v1 "no limit"
    text = "MemTotal:       32000 kB\nMemFree:  1000 kB\nMemAvailable:   20480 kB\n"
    assert meminfo_available(text) == 20480 * 1024


def test_configure_cpu_threads_respects_the_user(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert configure_cpu_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
        threads = configure_cpu_threads()
        assert 1 <= threads <= len(os.sched_getaffinity(0))
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_peak_memory_sees_an_allocation():
    with PeakMemory("cpu") as peak:
        block = torch.ones(50_000_000)  # 200 MB, touched
        time.sleep(0.05)
        del block
    assert peak.peak_bytes >= 180_000_000
    with PeakMemory("cpu") as idle:
        time.sleep(0.01)
    assert idle.peak_bytes < 100_000_000


# ---------------------------------------------------------------------- CT check
def test_ct_intensity_warning(ct, tmp_path):
    assert ct_intensity_warning(ct, tmp_path / "ct.nii.gz") is None
    unit = sitk.RescaleIntensity(sitk.Cast(ct, sitk.sitkFloat32), 0.0, 1.0)
    warning = ct_intensity_warning(unit, tmp_path / "unit.nii.gz")
    assert warning is not None and str(tmp_path / "unit.nii.gz") in warning
    assert "normalised" in warning
    mr_like = sitk.RescaleIntensity(ct, 0, 4095)
    warning = ct_intensity_warning(mr_like, tmp_path / "mr.nii.gz")
    assert warning is not None and str(tmp_path / "mr.nii.gz") in warning
    assert "Hounsfield" in warning
