"""Image and label reading/writing: formats, DICOM series, every bad input, atomic writes."""

from __future__ import annotations

import gzip
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import DATA, ROOT
from helpers import expect_error, untrained_model, write_dicom_series

from mtkd.data.image_io import (
    atomic_path,
    atomic_write_bytes,
    quiet_itk,
    read_image,
    read_label,
    write_image,
)
from mtkd.errors import MTKDError

ROI_SIZE, ROI_INDEX = [40, 30, 20], [40, 30, 40]


@pytest.fixture(scope="module")
def ct() -> sitk.Image:
    """A 40x30x20 crop of the real abdomen CT (int32 HU, 3 mm, LPS direction diag(-1,-1,1))."""
    return sitk.RegionOfInterest(
        sitk.ReadImage(str(DATA / "abdomen_ct.nii.gz")), ROI_SIZE, ROI_INDEX
    )


@pytest.fixture(scope="module")
def seg() -> sitk.Image:
    """The TotalSegmentator label map on the same crop."""
    image = sitk.ReadImage(str(DATA / "abdomen_seg_total_fast.nii.gz"))
    return sitk.RegionOfInterest(image, ROI_SIZE, ROI_INDEX)


@pytest.fixture(scope="module")
def spine() -> sitk.Image:
    """A 30x30x12 crop of the spine CT, whose direction is a non-axial rotation."""
    return sitk.RegionOfInterest(
        sitk.ReadImage(str(DATA / "spine_ct.nii.gz")), [30, 30, 12], [10, 5, 20]
    )


def assert_same_grid(a: sitk.Image, b: sitk.Image, atol: float = 1e-4) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=atol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=atol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=atol)


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_write_read_round_trip(tmp_path: Path, ct: sitk.Image, suffix: str) -> None:
    path = tmp_path / f"ct{suffix}"
    write_image(ct, path)
    image = read_image(path)
    assert image.GetPixelID() == sitk.sitkFloat32
    assert_same_grid(image, ct)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(ct))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left over


@pytest.mark.parametrize("suffix", [".mhd", ".nhdr"])
def test_detached_headers_are_read(tmp_path: Path, ct: sitk.Image, suffix: str) -> None:
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(ct, str(path))
    image = read_image(path)
    assert_same_grid(image, ct)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(ct))


def test_label_is_read_as_uint8_on_the_image_grid(tmp_path: Path, ct, seg) -> None:
    write_image(ct, tmp_path / "ct.nii.gz")
    write_image(sitk.Cast(seg, sitk.sitkFloat32), tmp_path / "seg.nrrd")  # float, whole numbers
    image = read_image(tmp_path / "ct.nii.gz")
    label = read_label(tmp_path / "seg.nrrd", reference=image)
    assert label.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), sitk.GetArrayFromImage(seg))


def test_large_label_values_give_uint16(tmp_path: Path, seg: sitk.Image) -> None:
    big = sitk.Cast(seg, sitk.sitkInt32) * 300
    write_image(big, tmp_path / "big.nii.gz")
    label = read_label(tmp_path / "big.nii.gz")
    assert label.GetPixelID() == sitk.sitkUInt16
    assert int(sitk.GetArrayViewFromImage(label).max()) == 300 * int(
        sitk.GetArrayViewFromImage(seg).max()
    )


def test_4d_nifti_with_trailing_singleton_is_squeezed(tmp_path: Path) -> None:
    data = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7, 1)
    affine = np.diag([2.0, 2.5, 3.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "a.nii.gz")
    image = read_image(tmp_path / "a.nii.gz")
    assert image.GetDimension() == 3 and image.GetSize() == (5, 6, 7)
    np.testing.assert_allclose(image.GetSpacing(), (2.0, 2.5, 3.0))


def test_4d_mha_with_trailing_singleton_is_squeezed(tmp_path: Path) -> None:
    # x, y, z, t = 5, 6, 7, 1
    volume = sitk.GetImageFromArray(np.ones((1, 7, 6, 5), np.int16), isVector=False)
    sitk.WriteImage(volume, str(tmp_path / "a.mha"))
    image = read_image(tmp_path / "a.mha")
    assert image.GetSize() == (5, 6, 7)


# ---------------------------------------------------------------- DICOM


@pytest.mark.parametrize("which", ["ct", "spine"])
def test_dicom_series_keeps_geometry_and_hu(tmp_path: Path, which: str, request) -> None:
    source = request.getfixturevalue(which)
    write_dicom_series(source, tmp_path / "series", "1.2.826.0.1.3680043.8.498.2")
    image = read_image(tmp_path / "series")
    assert image.GetPixelID() == sitk.sitkFloat32
    assert_same_grid(image, source, atol=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(source))


def test_folder_with_two_series_lists_their_uids(tmp_path: Path, ct) -> None:
    write_dicom_series(ct[:, :, :4], tmp_path, "1.2.826.0.1.3680043.8.498.10")
    write_dicom_series(ct[:, :, 4:8], tmp_path / "x", "1.2.826.0.1.3680043.8.498.11")
    for path in (tmp_path / "x").iterdir():
        path.rename(tmp_path / f"b_{path.name}")
    with expect_error(tmp_path, "2 DICOM series", "498.10", "498.11"):
        read_image(tmp_path)


def test_folder_without_dicom(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    with expect_error(tmp_path, "no DICOM"):
        read_image(tmp_path)


def test_dicom_series_with_a_missing_slice(tmp_path: Path, ct) -> None:
    write_dicom_series(ct[:, :, :8], tmp_path, "1.2.826.0.1.3680043.8.498.3", skip=4)
    with expect_error(tmp_path, "evenly spaced"):
        read_image(tmp_path)


def _truncate(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


@pytest.mark.parametrize("fraction", [0.0, 0.03, 0.5, 0.999])
def test_truncated_dicom_slice_is_named(tmp_path: Path, ct, fraction: float) -> None:
    """GDCM leaves a truncated slice out of the series without a word: it was reported as
    "slices not evenly spaced" for the folder. The file and the real problem are named."""
    write_dicom_series(ct[:, :, :8], tmp_path, "1.2.826.0.1.3680043.8.498.4")
    _truncate(tmp_path / "slice004.dcm", fraction)
    with expect_error(tmp_path / "slice004.dcm", "truncated or corrupt") as info:
        read_image(tmp_path)
    assert "evenly spaced" not in str(info.value)


def test_several_truncated_dicom_slices_are_listed(tmp_path: Path, ct) -> None:
    write_dicom_series(ct[:, :, :8], tmp_path, "1.2.826.0.1.3680043.8.498.5")
    for k in (0, 3, 7):  # the ends too: a series cut at its end is evenly spaced
        _truncate(tmp_path / f"slice{k:03d}.dcm", 0.6)
    with expect_error(tmp_path, "3 DICOM files", "truncated", "slice000.dcm", "slice007.dcm"):
        read_image(tmp_path)


def test_only_dicom_slice_truncated(tmp_path: Path, ct) -> None:
    """A folder whose single DICOM file is cut short: not "no DICOM series"."""
    write_dicom_series(ct[:, :, :1], tmp_path, "1.2.826.0.1.3680043.8.498.6")
    _truncate(tmp_path / "slice000.dcm", 0.5)
    with expect_error(tmp_path / "slice000.dcm", "truncated or corrupt"):
        read_image(tmp_path)


def test_truncated_slice_without_dicom_name_is_found_by_its_marker(tmp_path: Path, ct) -> None:
    """DICOM files often have no extension: the ``DICM`` marker identifies them."""
    write_dicom_series(ct[:, :, :6], tmp_path, "1.2.826.0.1.3680043.8.498.7")
    for path in tmp_path.iterdir():
        path.rename(path.with_suffix(""))
    _truncate(tmp_path / "slice002", 0.5)
    with expect_error(tmp_path / "slice002", "truncated or corrupt"):
        read_image(tmp_path)


def test_other_files_beside_a_series_are_ignored(tmp_path: Path, ct) -> None:
    write_dicom_series(ct[:, :, :6], tmp_path, "1.2.826.0.1.3680043.8.498.8")
    (tmp_path / "notes.txt").write_text("scanned on Tuesday")
    (tmp_path / ".DS_Store").write_bytes(np.random.default_rng(1).bytes(300))
    (tmp_path / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 50)
    image = read_image(tmp_path)
    assert image.GetSize() == (40, 30, 6)


def test_empty_folder_is_called_empty(tmp_path: Path) -> None:
    with expect_error(tmp_path) as info:
        read_image(tmp_path)
    assert "folder is empty" in info.value.problem


def test_folder_of_image_files_says_to_name_the_file(tmp_path: Path, ct) -> None:
    write_image(ct, tmp_path / "ct.nii.gz")
    with expect_error(tmp_path, "not a DICOM series", "ct.nii.gz"):
        read_image(tmp_path)


@pytest.mark.parametrize("problem", ["empty", "missing_slice", "truncated_slice", "good"])
def test_dicom_and_folder_reads_print_no_itk_warnings(tmp_path: Path, ct, capfd, problem):
    """ITK wrote multi-line ``WARNING: In .../itk...`` text straight to the process's standard
    error (file descriptor 2) for these folders; only our own message remains."""
    folder = tmp_path / "series"
    folder.mkdir()
    if problem != "empty":
        write_dicom_series(ct[:, :, :8], folder, "1.2.826.0.1.3680043.8.498.9", skip=4)
    if problem == "truncated_slice":
        write_dicom_series(ct[:, :, 4:5], tmp_path / "one", "1.2.826.0.1.3680043.8.498.9")
        (tmp_path / "one" / "slice000.dcm").rename(folder / "slice004.dcm")
        _truncate(folder / "slice004.dcm", 0.7)
    if problem == "good":
        write_dicom_series(ct[:, :, :8], folder, "1.2.826.0.1.3680043.8.498.9")
        assert read_image(folder).GetSize() == (40, 30, 8)
    else:
        with pytest.raises(MTKDError):
            read_image(folder)
    captured = capfd.readouterr()
    assert "WARNING" not in captured.err and "itk" not in captured.err.lower(), captured.err
    assert captured.out == ""


def test_quiet_itk_restores_the_warning_setting() -> None:
    before = sitk.ProcessObject.GetGlobalWarningDisplay()
    try:
        for setting in (True, False):
            sitk.ProcessObject.SetGlobalWarningDisplay(setting)
            with quiet_itk():
                assert not sitk.ProcessObject.GetGlobalWarningDisplay()
            assert sitk.ProcessObject.GetGlobalWarningDisplay() == setting
            with pytest.raises(RuntimeError), quiet_itk():
                raise RuntimeError("a failed read")
            assert sitk.ProcessObject.GetGlobalWarningDisplay() == setting
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(before)


@pytest.mark.parametrize("problem", ["empty", "missing_slice"])
def test_segment_command_stderr_has_one_clear_line(tmp_path: Path, ct, problem: str) -> None:
    """``python -m mtkd segment`` on an empty folder and on a DICOM series with a gap: the
    process's standard error holds one ``mtkd: error:`` line and no ITK warning text."""
    model = untrained_model(tmp_path / "model")
    folder = tmp_path / "series"
    folder.mkdir()
    if problem == "missing_slice":
        write_dicom_series(ct[:, :, :8], folder, "1.2.826.0.1.3680043.8.498.12", skip=4)
    result = subprocess.run(
        [sys.executable, "-m", "mtkd", "segment", str(model), str(folder), "-o", "out.nii.gz"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert "WARNING" not in result.stderr and "itk" not in result.stderr.lower(), result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"mtkd: error: {folder}"), result.stderr
    assert ("folder is empty" if problem == "empty" else "evenly spaced") in lines[0]
    assert not (tmp_path / "out.nii.gz").exists()


# ---------------------------------------------------------------- bad inputs


def test_missing_file(tmp_path: Path) -> None:
    with expect_error(tmp_path / "nope.nii.gz", "not found"):
        read_image(tmp_path / "nope.nii.gz")
    with expect_error(tmp_path / "nope.nii.gz", "not found"):
        read_label(tmp_path / "nope.nii.gz")


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "ct.png"
    path.write_bytes(b"\x89PNG")
    with expect_error(path, "unsupported"):
        read_image(path)


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "ct.nii.gz"
    path.write_bytes(np.random.default_rng(0).bytes(4000))
    with expect_error(path, "cannot read"):
        read_image(path)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_truncated_file(tmp_path: Path, ct, suffix: str) -> None:
    whole = tmp_path / f"whole{suffix}"
    write_image(ct, whole)
    data = whole.read_bytes()
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: len(data) * 2 // 3])
    with expect_error(path, "trunc"):
        read_image(path)


def test_2d_image(tmp_path: Path, ct) -> None:
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(ct[:, :, 3], str(path))
    with expect_error(path, "2-D"):
        read_image(path)


def test_single_slice_volume(tmp_path: Path, ct) -> None:
    path = tmp_path / "thin.nrrd"
    sitk.WriteImage(ct[:, :, 3:4], str(path))
    with expect_error(path, "single slice"):
        read_image(path)


def test_4d_image_with_several_volumes(tmp_path: Path) -> None:
    path = tmp_path / "t.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7, 3), np.float32), np.eye(4)), path)
    with expect_error(path, "4-D", "3 volumes"):
        read_image(path)


def test_vector_image(tmp_path: Path, ct) -> None:
    path = tmp_path / "rgb.mha"
    sitk.WriteImage(sitk.Compose([ct, ct, ct]), str(path))
    with expect_error(path, "vector", "3 components"):
        read_image(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_voxels(tmp_path: Path, ct, bad: float) -> None:
    array = sitk.GetArrayFromImage(ct).astype(np.float32)
    array[2, 3, 4] = bad
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(ct)
    path = tmp_path / "bad.nii.gz"
    write_image(image, path)
    with expect_error(path, "NaN" if np.isnan(bad) else "infinite"):
        read_image(path)
    with expect_error(path, "NaN" if np.isnan(bad) else "infinite"):
        read_label(path)


def _mha(path: Path, spacing: str) -> Path:
    header = (
        "ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\n"
        f"ElementSpacing = {spacing}\nElementType = MET_UCHAR\nElementDataFile = LOCAL\n"
    )
    path.write_bytes(header.encode() + bytes(8))
    return path


@pytest.mark.parametrize("spacing", ["0 1 1", "1 -2 1"])
def test_zero_or_negative_spacing_mha(tmp_path: Path, spacing: str) -> None:
    path = _mha(tmp_path / "bad.mha", spacing)
    with expect_error(path, "spacing"):
        read_image(path)


@pytest.mark.parametrize("value", [0.0, -2.0])
def test_bad_pixdim_nifti(tmp_path: Path, value: float) -> None:
    plain = tmp_path / "plain.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), plain)
    data = bytearray(plain.read_bytes())
    data[84:88] = np.float32(value).tobytes()  # pixdim[2] (NIfTI-1 header, little endian)
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(gzip.compress(bytes(data)))
    with expect_error(path, "spacing", "pixdim[2]"):
        read_image(path)


def test_non_integer_label(tmp_path: Path, seg) -> None:
    path = tmp_path / "soft.nii.gz"
    write_image(sitk.Cast(seg, sitk.sitkFloat32) * 0.5, path)
    with expect_error(path, "non-integer"):
        read_label(path)


def test_negative_label(tmp_path: Path, seg) -> None:
    path = tmp_path / "neg.nii.gz"
    write_image(sitk.Cast(seg, sitk.sitkInt16) - 1, path)
    with expect_error(path, "negative"):
        read_label(path)


def _moved(image: sitk.Image, **change) -> sitk.Image:
    moved = sitk.Image(image)
    if "origin" in change:
        moved.SetOrigin(change["origin"])
    if "spacing" in change:
        moved.SetSpacing(change["spacing"])
    if "direction" in change:
        moved.SetDirection(change["direction"])
    return moved


@pytest.mark.parametrize(
    "field, change",
    [
        ("origin", lambda im: {"origin": np.add(im.GetOrigin(), (0, 1.5, 0)).tolist()}),
        ("spacing", lambda im: {"spacing": (3.0, 3.0, 2.5)}),
        ("direction", lambda im: {"direction": _rotation(0.05)}),
    ],
)
def test_label_on_another_grid(tmp_path: Path, ct, seg, field, change) -> None:
    path = tmp_path / "seg.nii.gz"
    write_image(_moved(seg, **change(seg)), path)
    with expect_error(path, field, "label [", "image ["):
        read_label(path, reference=ct)


def test_label_with_another_size(tmp_path: Path, ct, seg) -> None:
    path = tmp_path / "seg.nii.gz"
    write_image(seg[:, :, 1:], path)
    with expect_error(path, "size", "40x30x19", "40x30x20"):
        read_label(path, reference=ct)


def test_label_grid_within_tolerance(tmp_path: Path, ct, seg) -> None:
    nudged = _moved(seg, origin=np.add(seg.GetOrigin(), (1e-5, -1e-5, 2e-5)).tolist())
    write_image(nudged, tmp_path / "seg.nii.gz")
    label = read_label(tmp_path / "seg.nii.gz", reference=ct)
    assert label.GetSize() == ct.GetSize()


def _rotation(angle: float) -> list[float]:
    c, s = math.cos(angle), math.sin(angle)
    return [-c, s, 0.0, -s, -c, 0.0, 0.0, 0.0, 1.0]


# ---------------------------------------------------------------- writing and atomicity


@pytest.mark.parametrize("name", ["out.png", "out.nhdr", "out"])
def test_write_unknown_extension(tmp_path: Path, ct, name: str) -> None:
    with expect_error(tmp_path / name, "file type"):
        write_image(ct, tmp_path / name)
    assert not any(tmp_path.iterdir())


def test_failed_image_write_keeps_old_file(tmp_path: Path, ct) -> None:
    path = tmp_path / "ct.nii.gz"
    write_image(ct, path)
    before = path.read_bytes()
    # An RLE label-map image cannot be written by any file writer: ITK raises while writing.
    unwritable = sitk.Cast(sitk.Cast(ct > 0, sitk.sitkUInt8), sitk.sitkLabelUInt8)
    with expect_error(path, "cannot write"):
        write_image(unwritable, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ct.nii.gz"]


def test_atomic_path_removes_partial_file_on_error(tmp_path: Path) -> None:
    path = tmp_path / "state.bin"
    atomic_write_bytes(path, b"old content")
    with pytest.raises(RuntimeError, match="disk died"), atomic_path(path) as temporary:
        assert temporary.parent == tmp_path and temporary.name.endswith("state.bin")
        with open(temporary, "wb") as stream:
            stream.write(b"new cont")  # half written, then the writer fails
            stream.flush()
            raise RuntimeError("disk died")
    assert path.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]


def test_atomic_path_that_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    atomic_write_bytes(path, b"keep")
    with expect_error(path, "nothing was written"), atomic_path(path):
        pass
    assert path.read_bytes() == b"keep"


def test_atomic_write_bytes_replaces_and_creates_folders(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "events.json"
    atomic_write_bytes(path, b"1")
    atomic_write_bytes(path, b"22")
    assert path.read_bytes() == b"22"
    assert os.listdir(path.parent) == ["events.json"]
