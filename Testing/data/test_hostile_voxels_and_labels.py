"""Hostile voxel values, pixel types and dimensions; label maps on another grid; Slicer
segmentations with rewritten segment fields (hypothesis; shared pieces in Testing/hostile.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from hostile import (
    DIRECTION,
    HOSTILE,
    ORIGIN,
    SHAPE,
    SPACING,
    assert_clear,
    assert_sane,
    attempt,
    reference_image,
    scratch,
)
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mtkd.data.datasets import load_dataset
from mtkd.data.image_io import read_image, read_label
from mtkd.data.labels import LabelTable
from mtkd.data.loading import read_case
from mtkd.data.segnrrd import read_seg_nrrd, write_seg_nrrd
from mtkd.errors import MTKDError

# --- voxel values, pixel types, dimensions -------------------------------------------------------

WRITERS = {"nii.gz": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha"}


def _write_array(array: np.ndarray, path: Path, vector: bool = False) -> None:
    image = sitk.GetImageFromArray(array, isVector=vector)
    sitk.WriteImage(image, str(path), useCompression=True)


@HOSTILE
@given(
    suffix=st.sampled_from(sorted(WRITERS.values())),
    array=hnp.arrays(
        st.sampled_from([np.float32, np.float64]),
        st.tuples(st.integers(2, 4), st.integers(2, 4), st.integers(2, 4)),
        elements={"allow_nan": True, "allow_infinity": True},
    ),
)
def test_nan_and_infinite_voxels_are_counted_or_values_kept(base, suffix, array):
    """NaN and infinite voxels are refused with their exact counts; finite voxels are read as
    float32, and float64 values beyond float32's range are refused rather than made infinite."""
    with scratch(base) as folder:
        path = Path(folder) / f"values{suffix}"
        _write_array(array, path)
        outcome = attempt(lambda: read_image(path))
        nan, infinite = int(np.isnan(array).sum()), int(np.isinf(array).sum())
        if nan or infinite:
            assert_clear(outcome, path, f"{nan} NaN and {infinite} infinite")
            assert_clear(attempt(lambda: read_label(path)), path, "NaN")
            return
        largest = float(np.abs(array).max())
        if largest > float(np.finfo(np.float32).max):
            assert_clear(outcome, path, "do not fit 32-bit floats")
            return
        assert not isinstance(outcome, MTKDError), outcome
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(outcome), array.astype(np.float32))


PIXEL_TYPES = [
    np.uint8,
    np.int8,
    np.uint16,
    np.int16,
    np.uint32,
    np.int32,
    np.int64,
    np.uint64,
    np.float32,
    np.float64,
    np.complex64,
    np.complex128,
]
VOLUME = st.tuples(st.integers(2, 4), st.integers(2, 4), st.integers(2, 4))
SHAPES = st.one_of(
    VOLUME,
    VOLUME,
    st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)),  # 3-D, maybe one slice
    st.tuples(st.integers(2, 4), st.integers(2, 4)),  # 2-D
    st.tuples(st.integers(1, 3), st.integers(2, 3), st.integers(2, 3), st.integers(2, 3)),  # 4-D
)


@settings(HOSTILE, max_examples=100)
@given(
    suffix=st.sampled_from([".nii", *sorted(WRITERS.values())]),
    dtype=st.sampled_from(PIXEL_TYPES),
    shape=SHAPES,
    vector=st.sampled_from([False, False, False, True]),
    data=st.data(),
)
def test_pixel_types_and_dimensions(base, suffix, dtype, shape, vector, data):
    """Every integer and float type is read as float32 (read_image) or as the same label values
    (read_label); complex, vector (RGB), 2-D, 4-D with several volumes and single-slice images
    are refused with a message that says so. A float16 image cannot be written by SimpleITK,
    nibabel or pynrrd (none of the three formats has a half-float type) and is not tested."""
    vector = vector and suffix != ".nii" and len(shape) == 3
    vector = vector and not np.issubdtype(dtype, np.complexfloating)
    if vector:
        shape = (*shape, 3)
    array = data.draw(hnp.arrays(dtype, shape), label="voxels")
    array = np.nan_to_num(array) if not np.issubdtype(dtype, np.integer) else array
    if np.issubdtype(dtype, np.floating):
        array = np.clip(array, -1e30, 1e30).astype(dtype)
    with scratch(base) as folder:
        path = Path(folder) / f"typed{suffix}"
        if suffix == ".nii":  # nibabel: (x, y, z[, t]) order
            nib.save(nib.Nifti1Image(array.T, np.eye(4), dtype=dtype), path)
        else:
            _write_array(array, path, vector)
        zyx = array
        image_outcome = attempt(lambda: read_image(path))
        label_outcome = attempt(lambda: read_label(path))
    spatial = list(shape[:3] if vector else shape)
    if len(spatial) == 4 and spatial[0] == 1:  # numpy order (t, z, y, x): one volume
        spatial = spatial[1:]
        zyx = zyx.reshape(spatial)
    if np.issubdtype(dtype, np.complexfloating):
        # NIfTI has a complex type; ITK reads complex NRRD and MetaImage voxels as complex or
        # as 2-vectors (depending on the dimension and on what it read before)
        as_complex = suffix.startswith(".nii") or "complex" in str(image_outcome)
        refusal = ("complex",) if as_complex else ("vector", "2 components")
    elif vector:
        refusal = ("vector", "3 components")
    elif len(spatial) != 3:
        refusal = (f"{len(spatial)}-D",) + ((f"{spatial[0]} volumes",) if len(spatial) == 4 else ())
    elif min(spatial) < 2:
        refusal = ("single slice",)
    else:
        refusal = None
    event("read" if refusal is None else f"refused: {refusal[0]}")
    if refusal is not None:
        for outcome in (image_outcome, label_outcome):
            assert_clear(outcome, path, *refusal)
        return
    assert not isinstance(image_outcome, MTKDError), image_outcome
    assert_sane(image_outcome, label=False)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image_outcome), zyx.astype(np.float32))
    if np.issubdtype(dtype, np.floating) and not np.array_equal(zyx, np.rint(zyx)):
        assert_clear(label_outcome, path, "non-integer")
    elif zyx.min() < 0:
        assert_clear(label_outcome, path, "negative")
    elif zyx.max() > 65535:
        assert_clear(label_outcome, path, "16 bits")
    else:
        assert not isinstance(label_outcome, MTKDError), label_outcome
        assert_sane(label_outcome, label=True)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(label_outcome), zyx)


# --- label maps on another grid; Slicer segmentations --------------------------------------------

GRID_CHANGES = st.fixed_dictionaries(
    {
        "size": st.sampled_from([0, 0, 1, -1]),
        "spacing": st.one_of(st.just(1.0), st.floats(1.01, 3.0), st.floats(0.3, 0.99)),
        "origin": st.one_of(st.just(0.0), st.floats(0.2, 50.0), st.floats(-50.0, -0.2)),
        "flip": st.sampled_from([False, False, True]),
        "jitter": st.floats(-1e-5, 1e-5),
    }
)


@HOSTILE
@given(axis=st.integers(0, 2), change=GRID_CHANGES)
def test_label_map_on_another_grid(base, axis, change):
    """A dataset case whose label map lies on another grid than its image (size, spacing,
    origin or direction) is refused naming the label file and what differs; differences
    within the tolerances (1e-5 here) are accepted and the case is read."""
    image = reference_image()
    label_values = (sitk.GetArrayFromImage(image) > 0).astype(np.uint8)
    size = list(image.GetSize())
    size[axis] += change["size"]
    label = sitk.Image(size, sitk.sitkUInt8)
    width = min(size[axis], image.GetSize()[axis])
    region = [slice(None)] * 3
    region[2 - axis] = slice(0, width)
    stored = sitk.GetArrayViewFromImage(label).copy()
    stored[tuple(region)] = label_values[tuple(region)]
    stored.flat[0] = 1  # never all background
    label = sitk.GetImageFromArray(stored)
    spacing = list(SPACING)
    spacing[axis] *= change["spacing"] * (1 + change["jitter"])
    origin = list(ORIGIN)
    origin[axis] += change["origin"] + change["jitter"]
    direction = np.array(DIRECTION).reshape(3, 3)
    if change["flip"]:
        direction[:, axis] *= -1
    label.SetSpacing(spacing)
    label.SetOrigin(origin)
    label.SetDirection(direction.ravel().tolist())
    differs = [
        name
        for name, changed in (
            ("size", change["size"] != 0),
            ("spacing", change["spacing"] != 1.0),
            ("origin", change["origin"] != 0.0),
            ("direction", change["flip"]),
        )
        if changed
    ]
    with scratch(base) as folder:
        root = Path(folder)
        (root / "images").mkdir()
        (root / "labels").mkdir()
        sitk.WriteImage(image, str(root / "images" / "case.nii.gz"))
        sitk.WriteImage(label, str(root / "labels" / "case.nii.gz"))
        (root / "labels.json").write_text(json.dumps({"1": "liver"}))
        dataset = attempt(lambda: load_dataset(root, labels_json=root / "labels.json"))
        assert not isinstance(dataset, MTKDError), dataset
        case = dataset.cases[0]
        outcome = attempt(lambda: read_case(case, dataset.labels, {1: 1}))
        if differs:
            assert_clear(outcome, case.label, "grid differs", differs[0])
        else:
            assert not isinstance(outcome, MTKDError), outcome
            assert outcome["label"].shape == outcome["image"].shape


SEGMENT_FIELDS = ["LabelValue", "Layer", "Name", "ID", "Extent", "Color"]


@pytest.fixture(scope="module")
def seg_file(base) -> tuple[bytes, sitk.Image]:
    """A valid two-segment Slicer .seg.nrrd (gzip) and its label map."""
    values = np.zeros(SHAPE, np.uint8)
    values[1:3, 1:3, 1:3] = 1
    values[4:, 3:, 2:] = 2
    labelmap = sitk.GetImageFromArray(values)
    labelmap.CopyInformation(reference_image())
    path = base / "original.seg.nrrd"
    write_seg_nrrd(labelmap, LabelTable({1: "liver", 2: "spleen"}), path)
    return path.read_bytes(), labelmap


@HOSTILE
@given(
    segment=st.integers(0, 1),
    field=st.sampled_from(SEGMENT_FIELDS),
    text=st.one_of(
        st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
        st.integers(-(2**70), 2**70).map(str),
        st.sampled_from(["1", "2", "0", "-1", "65536", "70000", "1.5", " 1 ", "nan", "1\n"]),
    ),
)
def test_seg_nrrd_with_rewritten_segment_fields(seg_file, base, segment, field, text):
    """A .seg.nrrd whose segment fields hold odd text (control characters, huge or negative
    label values, newlines): MTKDError naming the file, or the label map with a table that
    names every voxel value; a changed LabelValue can only be read if it is unchanged."""
    data, labelmap = seg_file
    original_value = segment + 1
    raw = bytearray(data)
    end = raw.index(b"\n\n") + 2
    header_text = raw[:end].decode("latin-1")
    key = f"Segment{segment}_{field}:="
    pattern = rf"^{re.escape(key)}.*$"
    header_text = re.sub(pattern, lambda _: key + text, header_text, count=1, flags=re.M)
    with scratch(base) as folder:
        path = Path(folder) / "odd.seg.nrrd"
        path.write_bytes(header_text.encode("utf-8") + bytes(raw[end:]))
        outcome = attempt(lambda: read_seg_nrrd(path))
        if isinstance(outcome, MTKDError):
            assert_clear(outcome, path)
            return
        label, table = outcome
        assert_sane(label, label=True)
        stored = sitk.GetArrayFromImage(label)
        np.testing.assert_array_equal(stored, sitk.GetArrayFromImage(labelmap))
        assert all(v in table for v in np.unique(stored) if v != 0)
        if field == "LabelValue":
            assert int(text.strip()) == original_value


def _label_arrays(dtype) -> st.SearchStrategy[np.ndarray]:
    """Small label-like arrays of ``dtype``: mostly values 0..5, some negative or huge."""
    info = np.iinfo(dtype)
    odd = st.integers(0, min(int(info.max), 2**40))
    if info.min < 0:
        odd = odd | st.integers(-5, -1)
    return hnp.arrays(
        dtype,
        st.tuples(st.integers(2, 3), st.integers(2, 3), st.integers(2, 3)),
        elements=st.one_of(st.integers(0, 5), st.integers(0, 5), odd),
    )


@HOSTILE
@given(
    array=st.sampled_from([np.uint8, np.uint16, np.int16, np.uint32, np.int64]).flatmap(
        _label_arrays
    )
)
def test_plain_label_nrrd_as_segmentation(base, array):
    """A plain label NRRD read as a segmentation: its values become the table (label_<n>), on
    UInt8/UInt16; negative values or values above 65535 are refused naming the file, never
    wrapped around."""
    with scratch(base) as folder:
        path = Path(folder) / "plain.seg.nrrd"
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(SPACING)
        image.SetDirection(DIRECTION)
        sitk.WriteImage(image, str(path), useCompression=True)
        outcome = attempt(lambda: read_seg_nrrd(path))
    event("negative" if array.min() < 0 else "above 65535" if array.max() > 65535 else "read")
    if array.min() < 0:
        assert_clear(outcome, path, "non-negative")
    elif array.max() > 65535:
        assert_clear(outcome, path, "16 bits")
    else:
        assert not isinstance(outcome, MTKDError), outcome
        label, table = outcome
        assert_sane(label, label=True)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(label), array)
        assert table.label_values == sorted(int(v) for v in np.unique(array) if v != 0)
