"""`mtkd segment` end to end on damaged, extreme but valid and too large inputs: one clear
line or a correct result (hypothesis; shared pieces in Testing/hostile.py)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hostile import HOSTILE, assert_one_line_error, no_hang, scratch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtkd.cli import main
from mtkd.data.image_io import read_image
from mtkd.data.labels import LabelTable
from mtkd.data.preprocess import Preprocessing
from mtkd.modelfiles.model_io import build_from_spec, export_model


def segment(model: Path, image: Path, output: Path, capsys) -> tuple[int, str]:
    """``mtkd segment`` in this process: its exit status and what it wrote to stderr."""
    capsys.readouterr()
    with no_hang():
        code = main(["segment", str(model), str(image), "-o", str(output), "--device", "cpu"])
    return code, capsys.readouterr().err


@settings(HOSTILE, max_examples=12)
@given(
    fmt=st.sampled_from(["nii.gz", "nrrd"]),
    damage=st.one_of(
        st.tuples(st.just("truncate"), st.floats(0.0, 1.0, exclude_max=True)),
        st.tuples(st.just("garble"), st.floats(0.0, 1.0, exclude_max=True)),
    ),
)
def test_segment_refuses_damaged_inputs_in_one_line(
    teacher_run, small_ct, base, capsys, fmt, damage
):
    """``mtkd segment`` on a truncated or garbled CT: exit status 2 and one line on stderr
    naming the file (no traceback), or a segmentation on the input's grid."""
    kind, where = damage
    with scratch(base) as folder:
        folder = Path(folder)
        path = folder / f"ct.{fmt}"
        sitk.WriteImage(sitk.ReadImage(str(small_ct)), str(path))
        data = bytearray(path.read_bytes())
        if kind == "truncate":
            data = data[: int(len(data) * where)]
        else:
            head = 348 if fmt == "nii.gz" else data.index(b"\n\n")
            if fmt == "nii.gz":
                data = bytearray(gzip.decompress(bytes(data)))
            start = int(where * head)
            data[start : start + 4] = b"\xff\x00\x7f\x80"[: head - start]
            data = bytearray(gzip.compress(bytes(data))) if fmt == "nii.gz" else data
        path.write_bytes(bytes(data))
        output = folder / "out.nii.gz"
        code, error = segment(teacher_run, path, output, capsys)
        if code == 0:
            result, source = sitk.ReadImage(str(output)), read_image(path)
            assert result.GetSize() == source.GetSize()
            np.testing.assert_allclose(result.GetSpacing(), source.GetSpacing(), rtol=1e-5)
            np.testing.assert_allclose(result.GetOrigin(), source.GetOrigin(), atol=1e-3)
        else:
            assert_one_line_error(code, error, path)
            assert not output.exists()


EXTREME_INPUTS = {
    # name: (change to the small CT, words of the expected error or None for a segmentation)
    "very anisotropic": (lambda im: _with_spacing(im, (0.5, 0.5, 50.0)), None),
    "two slices": (lambda im: im[:, :, :2], None),
    "NaN voxels": (lambda im: _with_nan(im), ("NaN",)),
    "single slice": (lambda im: im[:, :, :1], ("single slice",)),
    "spacing 1e30": (lambda im: _with_spacing(im, (1e30, 1.0, 1.0)), ("implausible", "spacing")),
    "spacing 1e-30": (lambda im: _with_spacing(im, (1e-30, 1.0, 1.0)), ("spacing",)),
}


def _with_spacing(image: sitk.Image, spacing: tuple[float, float, float]) -> sitk.Image:
    image = sitk.Image(image)
    image.SetSpacing(spacing)
    return image


def _with_nan(image: sitk.Image) -> sitk.Image:
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    array[1, 2, 3:6] = np.nan
    changed = sitk.GetImageFromArray(array)
    changed.CopyInformation(image)
    return changed


@pytest.fixture(scope="module")
def resampling_model(base) -> Path:
    """An untrained tiny 2-D model folder that resamples its input to 3 mm voxels and crops
    the foreground (the teacher_run model only resizes slices): the path that resamples."""
    torch.manual_seed(0)
    spec = {
        "name": "thesis_unet",
        "params": {"in_channels": 1, "out_channels": 3, "channels": [4], "bottleneck": 8},
        "reconstruction": "none",
    }
    prep = Preprocessing(
        dims=2,
        hu_window=(-160.0, 240.0),
        spacing=(3.0, 3.0, 3.0),
        crop_foreground=True,
        slice_size=(32, 32),
        patch_size=(32, 32, 32),
        in_channels=1,
    )
    folder = base / "resampling-model"
    export_model(
        build_from_spec(spec),
        folder,
        spec=spec,
        labels=LabelTable({1: "liver", 2: "spleen"}),
        prep=prep,
        activation="softmax",
        lineage={"kind": "test"},
    )
    return folder


@pytest.mark.parametrize("model", ["teacher_run", "resampling_model"])
@pytest.mark.parametrize("name", sorted(EXTREME_INPUTS))
def test_segment_extreme_but_valid_files(request, small_ct, tmp_path, capsys, name, model):
    """Valid files with extreme content: a segmentation on the input's grid, or one clear line;
    with a model that resizes slices and with one that resamples to its spacing."""
    change, words = EXTREME_INPUTS[name]
    path = tmp_path / "extreme.nrrd"
    sitk.WriteImage(change(sitk.ReadImage(str(small_ct))), str(path))
    output = tmp_path / "out.nii.gz"
    code, error = segment(request.getfixturevalue(model), path, output, capsys)
    if words is None:
        assert code == 0, error
        result, source = sitk.ReadImage(str(output)), sitk.ReadImage(str(path))
        assert result.GetSize() == source.GetSize()
        np.testing.assert_allclose(result.GetSpacing(), source.GetSpacing(), rtol=1e-6)
        assert sitk.GetArrayViewFromImage(result).max() <= 3  # the model's label values
    else:
        assert_one_line_error(code, error, path, *words)


def test_segment_refuses_an_image_too_large_at_the_model_spacing(
    resampling_model, small_ct, tmp_path, capsys
):
    """A CT with 1 m voxels (a header in metres read as mm) is within the readable spacings,
    but at the model's 3 mm it would have ~10^11 voxels: refused before resampling, naming
    the file (it used to resample without end)."""
    path = tmp_path / "metres.nrrd"
    sitk.WriteImage(_with_spacing(sitk.ReadImage(str(small_ct)), (1000.0, 1000.0, 1000.0)), path)
    code, error = segment(resampling_model, path, tmp_path / "out.nii.gz", capsys)
    assert_one_line_error(code, error, path, "model's spacing", "voxels")
