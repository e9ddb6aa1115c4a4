"""A very large volume is segmented in parts within the stated memory bound, with the labels
of the one-piece path: network input, probabilities and labels are made slab by slab along z
(``mtkd.infer.model_input.ModelInput``, ``mtkd.infer.inference.predict_in_slabs``,
``GridMapping.to_original``); the bound is ``mtkd.infer.memory.segmentation_memory_bound``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import load_bench_script
from monai.data.utils import dense_patch_slices
from test_infer_fast import flipped, make_prep, rotated, tiny_model

from mtkd.infer.inference import predict_planned, window_starts, window_tiles
from mtkd.infer.memory import segmentation_memory_bound
from mtkd.infer.model_input import ModelInput, preprocess
from mtkd.infer.predictor import Predictor
from mtkd.modelfiles.model_io import LoadedModel, load_model

CPU = torch.device("cpu")
ONE_PIECE = 1 << 40  # bytes: every chunk and slab the whole volume


def load_benchmark():
    """``bench/large_volume.py`` (the phantom, the models and the child-process measure)."""
    return load_bench_script("large_volume.py", "large_volume_bench")


BENCH = load_benchmark()


def calibrated(model: LoadedModel, image: sitk.Image) -> LoadedModel:
    """``model`` with batch-norm statistics of ``image``, so that random weights give
    labels that vary over the image."""
    BENCH.calibrate(model.network, model.prep, image)
    return model


@pytest.fixture(scope="module")
def ct(data_dir) -> sitk.Image:
    return sitk.ReadImage(str(data_dir / "abdomen_ct.nii.gz"))


def one_piece(model: LoadedModel, image: sitk.Image, budget: int) -> tuple[np.ndarray, str]:
    """Labels (Z, Y, X) of the unchunked path: the whole network input, one prediction of
    the whole volume as the plan for ``budget`` says, one inverse mapping; and that plan."""
    volume, mapping = preprocess(image, model.prep)
    plan = Predictor(model, memory_budget_bytes=budget).plan(tuple(volume.shape[1:]))
    network, prep, multiple = model.network, model.prep, model.size_multiple
    with torch.inference_mode():
        probabilities = predict_planned(
            network, volume, prep, model.activation, CPU, plan, size_multiple=multiple
        )
    labels = mapping.to_original(
        probabilities, model.activation, len(model.labels), chunk_bytes=ONE_PIECE
    )
    return labels.transpose(2, 1, 0), plan.describe()


def slab_bytes_for_depth(image: sitk.Image, model: LoadedModel, depth: int) -> int:
    """Slab bytes that make ``ModelInput`` read ``depth`` z slices at a time."""
    mapping = ModelInput(image, model.prep).mapping
    plane = max(math.prod(mapping.resampled_size[:2]), math.prod(mapping.oriented_size[:2]))
    slab_bytes = 4 * plane * depth
    assert ModelInput(image, model.prep, slab_bytes=slab_bytes).slab_depth == depth
    return slab_bytes


def assert_slabs_give_one_piece(model: LoadedModel, image: sitk.Image, budget: int, depth: int):
    """The predictor's labels with slabs of ``depth`` slices equal the unchunked labels."""
    expected, plan = one_piece(model, image, budget)
    slab_bytes = slab_bytes_for_depth(image, model, depth)
    prediction = Predictor(model, memory_budget_bytes=budget, slab_bytes=slab_bytes).predict(image)
    labels = sitk.GetArrayViewFromImage(prediction.labelmap)
    assert prediction.plan == plan
    assert labels.max() > 0 and (labels == 0).any()  # a meaningful comparison
    np.testing.assert_array_equal(labels, expected)
    return prediction


# ---------------------------------------------------------------------- the same labels
CASES_2D = {
    # image, model spacing, slice size; the CT is 122 x 101 x 112 voxels at 3 mm
    "native-spacing": ("ct", None, (64, 48)),
    "permuted-flipped-z-resampled": ("flipped", (4.5, 4.5, 6.0), (48, 48)),
    "int16-in-plane-spacing": ("int16", (2.5, 2.5, -1.0), (40, 56)),
}


def case_image(ct: sitk.Image, name: str) -> sitk.Image:
    if name == "flipped":
        return flipped(ct)
    if name == "rotated":
        return rotated(ct)
    if name == "int16":  # an odd size, stored as int16 (read without conversion)
        return sitk.Cast(sitk.RegionOfInterest(ct, [117, 97, 101], [2, 1, 5]), sitk.sitkInt16)
    return ct


@pytest.mark.parametrize("case", list(CASES_2D))
def test_2d_slabs_give_the_one_piece_labels(ct, case):
    """Slices in batches of 5 and slabs of 9 slices (neither divides the depth)."""
    image_name, spacing, slice_size = CASES_2D[case]
    image = case_image(ct, image_name)
    model = tiny_model(2, make_prep(2, spacing, slice_size=slice_size))
    model = calibrated(model, image)
    volume, _ = preprocess(image, model.prep)
    assert volume.shape[3] % 5 and volume.shape[3] % 9
    per_voxel = Predictor(model).plan(tuple(volume.shape[1:]), ONE_PIECE).bytes_per_voxel
    budget = int(per_voxel * math.prod(slice_size) * 5.5)
    prediction = assert_slabs_give_one_piece(model, image, budget, depth=9)
    assert prediction.plan.endswith("5 slices per batch")


CASES_3D = {
    # image, model spacing, patch, memory budget in windows (None: whole volume)
    "whole-rotated": ("rotated", (4.5, 4.5, 6.0), (32, 32, 16), None),
    "sliding-int16": ("int16", (4.0, 4.0, 3.5), (32, 32, 16), 3),
    "sliding-upsampled": ("ct-block", (2.0, 1.5, 2.5), (32, 32, 16), 2),
}


@pytest.mark.parametrize("case", list(CASES_3D))
def test_3d_slabs_give_the_one_piece_labels(ct, case):
    """Whole-volume and sliding-window plans, slabs of 5 slices: the sliding windows run in
    tiles of one or two window rows, MONAI's windows on the same positions."""
    image_name, spacing, patch, windows = CASES_3D[case]
    if image_name == "ct-block":  # finer model spacing than the image: upsampling
        image = sitk.RegionOfInterest(ct, [61, 47, 43], [30, 25, 40])
    else:
        image = case_image(ct, image_name)
    model = calibrated(tiny_model(3, make_prep(3, spacing, patch_size=patch)), image)
    volume, _ = preprocess(image, model.prep)
    plan = Predictor(model).plan(tuple(volume.shape[1:]), ONE_PIECE)
    window_bytes = plan.bytes_per_voxel * math.prod(patch)
    budget = ONE_PIECE if windows is None else int(window_bytes * (windows + 0.5))
    prediction = assert_slabs_give_one_piece(model, image, budget, depth=5)
    if windows is None:
        assert prediction.plan.startswith("whole volume")
    else:
        assert prediction.plan == f"sliding window 32x32x16, {windows} windows per batch"
        rows = len(window_starts(volume.shape[3], patch[2]))
        assert rows >= 3  # several tiles


def test_trained_2d_model_in_slabs_of_one_slice(teacher_run, ct):
    """A trained model (the conftest teacher), slabs and chunks of a single slice."""
    model = load_model(teacher_run)
    assert_slabs_give_one_piece(model, ct, ONE_PIECE, depth=1)


# ---------------------------------------------------------------------- the pieces
@pytest.mark.parametrize(("size", "window", "rows"), [(16, 16, 1), (100, 16, 1), (100, 16, 3)])
def test_window_tiles_cover_the_volume_once_with_monai_windows(size, window, rows):
    starts = window_starts(size, window)
    monai = sorted({s[0].start for s in dense_patch_slices((size,), (window,), (12,))})
    assert starts == (monai if window < size else [0])
    tiles = window_tiles(size, window, rows)
    assert tiles[0][2] == 0 and tiles[-1][3] == size
    for (start, stop, keep_start, keep_stop), following in zip(tiles, tiles[1:] + [None]):
        assert start in starts and stop - window in starts  # whole windows, MONAI positions
        assert start <= keep_start < keep_stop <= stop
        covering = [s for s in starts if s < keep_stop and s + window > keep_start]
        assert all(start <= s and s + window <= stop for s in covering)  # all in the tile
        if following is not None:
            assert following[2] == keep_stop  # consecutive kept ranges
    assert len(tiles) == -(-len(starts) // rows)


def test_slabs_must_continue_each_other(ct):
    model = tiny_model(2, make_prep(2, slice_size=(32, 32)))
    volume, mapping = preprocess(ct, model.prep)
    probabilities = torch.softmax(torch.randn((4, *volume.shape[1:])), dim=0)
    gap = [(0, probabilities[..., :10]), (11, probabilities[..., 11:])]
    with pytest.raises(ValueError, match="does not continue"):
        mapping.to_original(iter(gap), "softmax", chunk_bytes=1 << 16)
    with pytest.raises(ValueError, match="ends at z = 10"):
        mapping.to_original(iter(gap[:1]), "softmax", chunk_bytes=1 << 16)


def test_peak_memory_within_the_bound_in_process(teacher_run):
    """512 x 512 x 160 int16: the prediction holds the labels and a few slabs, never a
    full-resolution float copy of the image (168 MB) or of the probabilities."""
    array = np.full((160, 512, 512), -1000, dtype=np.int16)
    array[:, 100:400, 80:440] = 40  # a body
    array[40:120, 180:300, 150:300] = 80  # an organ
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.8, 1.0))
    del array
    predictor = Predictor(load_model(teacher_run), slab_bytes=8 << 20)
    prediction = predictor.predict(image)
    model_size = ModelInput(image, predictor.model.prep).mapping.model_size
    plan = predictor.plan(model_size)
    voxels = image.GetNumberOfPixels()
    # the image existed before; the labels once (the SimpleITK copy is made after the peak)
    bound = segmentation_memory_bound(0, voxels, plan) - voxels
    assert 0 < prediction.peak_memory_bytes <= bound, (prediction.peak_memory_bytes, bound)
    assert bound < 4 * voxels  # less than one float32 copy of the image


# ---------------------------------------------------------------------- end to end, large
@pytest.mark.slow
def test_512x512x1200_segmented_end_to_end_within_the_bound(tmp_path):
    """``python -m mtkd segment`` on a 512 x 512 x 1200 int16 CT with a 2-D and a 3-D model:
    the child's peak resident memory stays under the stated bound, the output lies on the
    input's grid, and its labels equal those of the same model on a part of the volume."""
    size = (512, 512, 1200)
    ct, models = BENCH.prepare(tmp_path, size, ["2d", "3d"])
    image = sitk.ReadImage(str(ct))
    formats = {"2d": ".seg.nrrd", "3d": ".nii.gz"}  # both writers: Slicer's format and NIfTI
    for kind, model_dir in models.items():
        output = tmp_path / f"labels_{kind}{formats[kind]}"
        run = BENCH.run_with_peak_memory(BENCH.segment_command(model_dir, ct, output))
        assert run.returncode == 0, run.stderr
        bound, plan = BENCH.memory_bound(model_dir, image)  # the image held as int16
        assert plan.describe() in run.stdout  # the child ran this plan
        assert run.peak_rss_bytes <= bound, (kind, run.peak_rss_bytes / 2**30, bound / 2**30)
        labels = sitk.ReadImage(str(output))
        assert labels.GetSize() == image.GetSize()
        for query in ("GetSpacing", "GetOrigin", "GetDirection"):  # NIfTI stores float32
            np.testing.assert_allclose(getattr(labels, query)(), getattr(image, query)(), atol=1e-6)
        predictor = Predictor(load_model(model_dir))
        assert BENCH.agreement_on_part(predictor, image, labels, kind) == 1.0
        assert len(np.unique(sitk.GetArrayViewFromImage(labels)[::8])) > 1
