"""Hostile image files for the readers (NIfTI, NRRD, MetaImage, dataset cases): truncated,
garbled, extreme and inconsistent headers, declared sizes beyond the data (hypothesis;
shared pieces in Testing/hostile.py)."""

from __future__ import annotations

import gzip
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hostile import (
    DIRECTION,
    HOSTILE,
    ORIGIN,
    SPACING,
    assert_clear,
    assert_sane,
    attempt,
    reference_image,
    scratch,
)
from hypothesis import event, given
from hypothesis import strategies as st

from mtkd.data.image_io import SPACING_RANGE_MM, read_image, read_label
from mtkd.data.segnrrd import read_seg_nrrd
from mtkd.errors import MTKDError

# --- valid originals ---------------------------------------------------------------------------

# format -> (file name, compressed); .nhdr and .mhd keep their voxels in a separate .raw file
FORMATS = {
    "nii": ("ct.nii", False),
    "nii.gz": ("ct.nii.gz", True),
    "nrrd": ("ct.nrrd", False),
    "nrrd-gzip": ("ct.nrrd", True),
    "nhdr": ("ct.nhdr", False),
    "mha": ("ct.mha", False),
    "mha-zlib": ("ct.mha", True),
    "mhd": ("ct.mhd", False),
}
NRRD_LIKE = ("nrrd", "nrrd-gzip", "nhdr")


class Originals(dict):
    """format -> {file name: bytes}; shown briefly in hypothesis' failure reports."""

    def __repr__(self) -> str:
        return f"<the reference volume in {', '.join(self)}>"


@pytest.fixture(scope="module")
def originals(base) -> Originals:
    """The reference volume written in every format: format -> {file name: bytes}."""
    files = Originals()
    for fmt, (name, compressed) in FORMATS.items():
        folder = base / f"original-{fmt}"
        folder.mkdir()
        sitk.WriteImage(reference_image(), str(folder / name), useCompression=compressed)
        files[fmt] = {p.name: p.read_bytes() for p in folder.iterdir()}
    return files


def materialize(fmt: str, files: dict[str, bytes], folder: Path) -> Path:
    """Write ``files`` into ``folder``; the path to read (the header for .nhdr/.mhd)."""
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder / FORMATS[fmt][0]


def header_end(fmt: str, data: bytes) -> int:
    """Where the header of a (decompressed, for .nii.gz) main file ends."""
    if fmt.startswith("nii"):
        return 348
    if fmt in ("nhdr", "mhd"):
        return len(data)
    if fmt.startswith("nrrd"):
        return data.index(b"\n\n") + 2
    return data.index(b"ElementDataFile = LOCAL\n") + len("ElementDataFile = LOCAL\n")


def assert_same_as_reference(image: sitk.Image, label: bool) -> None:
    reference = reference_image()
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), SPACING, rtol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), ORIGIN, atol=1e-5)
    np.testing.assert_allclose(image.GetDirection(), DIRECTION, atol=1e-6)
    expected = sitk.GetArrayFromImage(reference)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), expected)


READERS = {
    "read_image": (read_image, False),
    "read_label": (read_label, True),
    "read_seg_nrrd": (lambda path: read_seg_nrrd(path)[0], True),
}


def readers_for(fmt: str) -> list[str]:
    return ["read_image", "read_label"] + (["read_seg_nrrd"] if fmt in NRRD_LIKE else [])


# --- corrupted files -----------------------------------------------------------------------------


@HOSTILE
@given(
    fmt=st.sampled_from(sorted(FORMATS)),
    which=st.sampled_from(["main", "data"]),
    fraction=st.floats(0.0, 1.0, exclude_max=True),
    reader=st.sampled_from(["read_image", "read_label", "read_seg_nrrd"]),
)
def test_truncated_files_are_refused_or_read_whole(originals, base, fmt, which, fraction, reader):
    """A file cut anywhere is refused naming it, or (a cut in a trailer nothing needs) read
    exactly as written."""
    files = dict(originals[fmt])
    main_name = FORMATS[fmt][0]
    name = next((n for n in files if n != main_name), main_name) if which == "data" else main_name
    files[name] = files[name][: int(len(files[name]) * fraction)]
    read, label = READERS[reader if reader in readers_for(fmt) else "read_image"]
    with scratch(base) as folder:
        path = materialize(fmt, files, Path(folder))
        outcome = attempt(lambda: read(path))
        event("refused" if isinstance(outcome, MTKDError) else "read whole")
        if isinstance(outcome, MTKDError):
            assert_clear(outcome, path)
        else:
            assert_sane(outcome, label)
            assert_same_as_reference(outcome, label)


@HOSTILE
@given(
    fmt=st.sampled_from(sorted(FORMATS)),
    in_header=st.booleans(),
    changes=st.lists(
        st.tuples(st.floats(0, 1, exclude_max=True), st.binary(min_size=1, max_size=3)),
        min_size=1,
        max_size=6,
    ),
    reader=st.sampled_from(["read_image", "read_label", "read_seg_nrrd"]),
)
def test_garbled_bytes_are_refused_or_give_a_sane_image(
    originals, base, fmt, in_header, changes, reader
):
    """Bytes overwritten in the header (of the decompressed stream for .nii.gz) or anywhere in
    the file: MTKDError naming the file, or an image that satisfies every reader invariant."""
    files = dict(originals[fmt])
    name = FORMATS[fmt][0]
    data = bytearray(gzip.decompress(files[name]) if fmt == "nii.gz" and in_header else files[name])
    span = header_end(fmt, bytes(data)) if in_header else len(data)
    for where, replacement in changes:
        start = int(where * span)
        data[start : start + len(replacement)] = replacement[: max(0, span - start)]
    files[name] = gzip.compress(bytes(data)) if fmt == "nii.gz" and in_header else bytes(data)
    read, label = READERS[reader if reader in readers_for(fmt) else "read_image"]
    with scratch(base) as folder:
        path = materialize(fmt, files, Path(folder))
        outcome = attempt(lambda: read(path))
        event("refused" if isinstance(outcome, MTKDError) else "read")
        if isinstance(outcome, MTKDError):
            assert_clear(outcome, path)
        else:
            assert_sane(outcome, label)


def _int16(value: int) -> int:
    return (value + 2**15) % 2**16 - 2**15


def _float32(value: float) -> float:
    with np.errstate(over="ignore"):
        return float(np.array(value, dtype=np.float64).astype(np.float32))


def rewrite_field(fmt: str, data: bytes, field: str, axis: int, value) -> tuple[bytes, object]:
    """``data`` (a main file, decompressed for NIfTI) with one header field of ``axis`` set to
    ``value``, and what a reader must then report for it (size, spacing or origin)."""
    if fmt.startswith("nii"):
        data = bytearray(data)
        if field == "size":
            stored = _int16(int(value))
            data[42 + 2 * axis : 44 + 2 * axis] = struct.pack("<h", stored)
            return bytes(data), stored
        if field == "spacing":  # pixdim; zero, negative or non-finite ones are refused
            stored = _float32(value)
            data[80 + 4 * axis : 84 + 4 * axis] = struct.pack("<f", stored)
            return bytes(data), stored if stored > 0 else math.nan
        stored = _float32(value)  # origin: the sform's and the qform's offsets, in RAS
        ras = -stored if axis < 2 else stored
        data[292 + 16 * axis : 296 + 16 * axis] = struct.pack("<f", ras)
        data[268 + 4 * axis : 272 + 4 * axis] = struct.pack("<f", ras)
        return bytes(data), stored
    text = data.decode("latin-1")
    if fmt.startswith("nrrd") or fmt == "nhdr":
        if field == "size":
            sizes = list(reference_image().GetSize())
            sizes[axis] = int(value)
            key, new = "sizes", " ".join(map(str, sizes))
            expected = int(value)
        elif field == "spacing":  # a negative one flips the axis' direction
            columns = np.array(DIRECTION).reshape(3, 3).T * np.array(SPACING)[:, None]
            with np.errstate(all="ignore"):
                columns[axis] = np.array(DIRECTION).reshape(3, 3)[:, axis] * value
                key = "space directions"
                new = " ".join("(" + ",".join(repr(float(c)) for c in col) + ")" for col in columns)
                expected = float(np.linalg.norm(columns[axis]))
            expected = expected if expected > 0 else math.nan
        else:
            origin = list(ORIGIN)
            origin[axis] = value
            key, new = "space origin", "(" + ",".join(repr(float(v)) for v in origin) + ")"
            expected = float(value)
        text = re.sub(rf"^{key}: .*$", f"{key}: {new}", text, count=1, flags=re.MULTILINE)
    else:
        key = {"size": "DimSize", "spacing": "ElementSpacing", "origin": "Offset"}[field]
        values = {
            "size": list(reference_image().GetSize()),
            "spacing": list(SPACING),
            "origin": list(ORIGIN),
        }[field]
        values[axis] = int(value) if field == "size" else value
        new = " ".join(repr(float(v)) if field != "size" else str(v) for v in values)
        text = re.sub(rf"^{key} = .*$", f"{key} = {new}", text, count=1, flags=re.MULTILINE)
        expected = values[axis]
        if field == "spacing" and not expected > 0:
            expected = math.nan  # zero or negative: refused
    return text.encode("latin-1"), expected


EXTREME_FLOATS = st.one_of(
    st.sampled_from([0.0, -0.0, -1.0, math.nan, math.inf, -math.inf, 1e30, 1e-30, 5e-324]),
    st.sampled_from([1e308, 1e-3, 1e3, 999.0, 0.0011, 7.5, 0.3]),
    st.floats(allow_nan=True, allow_infinity=True),
)
EXTREME_SIZES = st.one_of(
    st.sampled_from([0, 1, -1, -4, 32767, 100000, 2**31 - 1, 2**32 + 3, 2**62]),
    st.integers(2, 6),  # the stored size or smaller: readable
    st.integers(-10, 70),
)


@HOSTILE
@given(
    fmt=st.sampled_from(["nii", "nii.gz", "nrrd", "nrrd-gzip", "nhdr", "mha", "mhd"]),
    axis=st.integers(0, 2),
    field_value=st.one_of(
        st.tuples(st.just("size"), EXTREME_SIZES),
        st.tuples(st.sampled_from(["spacing", "origin"]), EXTREME_FLOATS),
    ),
    reader=st.sampled_from(["read_image", "read_label"]),
)
def test_extreme_header_fields(originals, base, fmt, axis, field_value, reader):
    """Sizes, spacings and origins rewritten to zero, negative, huge, tiny, NaN or infinite
    values: the image as the header describes it, or MTKDError naming the file (and the
    spacing, for spacings that are finite but outside the accepted range)."""
    field, value = field_value
    files = dict(originals[fmt])
    name = FORMATS[fmt][0]
    data = gzip.decompress(files[name]) if fmt == "nii.gz" else files[name]
    data, expected = rewrite_field(fmt, data, field, axis, value)
    files[name] = gzip.compress(data) if fmt == "nii.gz" else data
    read, label = READERS[reader]
    low, high = SPACING_RANGE_MM
    with scratch(base) as folder:
        path = materialize(fmt, files, Path(folder))
        outcome = attempt(lambda: read(path))
    if field == "size":  # a smaller size may still fail (e.g. compressed data left over)
        must_fail = expected < 2 or expected > reference_image().GetSize()[axis]
    elif field == "spacing":
        must_fail = not (math.isfinite(expected) and low <= expected <= high)
    else:
        must_fail = not math.isfinite(expected)
    event(f"{field}: {'refused' if isinstance(outcome, MTKDError) else 'read'}")
    if isinstance(outcome, MTKDError):
        finite_spacing = field == "spacing" and math.isfinite(expected)
        assert_clear(outcome, path, *(("spacing",) if finite_spacing else ()))
        assert must_fail or field == "size", f"refused a valid {field}: {outcome}"
        return
    assert not must_fail, f"read an image with {field} {expected!r}"
    assert_sane(outcome, label)
    if field == "size":
        assert outcome.GetSize()[axis] == expected
        return
    if field == "spacing":
        assert math.isclose(outcome.GetSpacing()[axis], expected, rel_tol=1e-6)
    else:
        assert math.isclose(outcome.GetOrigin()[axis], expected, rel_tol=1e-6, abs_tol=1e-6)
    reference = sitk.GetArrayFromImage(reference_image())
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(outcome), reference)


NIFTI_FIELDS = {
    # field: (offset, struct format, strategy of stored values)
    "sizeof_hdr": (0, "<i", st.just(348) | st.integers(-(2**31), 2**31 - 1)),
    "magic": (344, "4s", st.just(b"n+1\x00") | st.binary(min_size=4, max_size=4)),
    "vox_offset": (108, "<f", st.sampled_from([352.0, 0.0, 348.0, 368.0]) | st.floats(width=32)),
}


@HOSTILE
@given(
    fmt=st.sampled_from(["nii", "nii.gz"]),
    field_value=st.one_of(
        *(st.tuples(st.just(name), values) for name, (_, _, values) in NIFTI_FIELDS.items())
    ),
    reader=st.sampled_from(["read_image", "read_label"]),
)
def test_nifti_identity_fields(originals, base, fmt, field_value, reader):
    """A NIfTI whose header size, magic or voxel offset is damaged is refused naming the file
    (ITK would read it anyway: as an Analyze file without orientation, or from another
    offset); only the valid values (348, n+1, at least 352 within the file) are read."""
    field, value = field_value
    offset, layout, _ = NIFTI_FIELDS[field]
    files = dict(originals[fmt])
    name = FORMATS[fmt][0]
    data = bytearray(gzip.decompress(files[name]) if fmt == "nii.gz" else files[name])
    data[offset : offset + struct.calcsize(layout)] = struct.pack(layout, value)
    files[name] = gzip.compress(bytes(data)) if fmt == "nii.gz" else bytes(data)
    valid = {
        "sizeof_hdr": value == 348,
        "magic": value == b"n+1\x00",
        "vox_offset": value == 352.0,  # the voxels start there; other offsets misread them
    }[field]
    read, label = READERS[reader]
    with scratch(base) as folder:
        path = materialize(fmt, files, Path(folder))
        outcome = attempt(lambda: read(path))
    event("read" if valid else "refused")
    if not valid:
        assert_clear(outcome, path)
        return
    assert not isinstance(outcome, MTKDError), outcome
    assert_same_as_reference(outcome, label)


@given(
    fmt=st.sampled_from(sorted(FORMATS)),
    sizes=st.tuples(st.integers(1100, 32767), st.integers(1100, 32767), st.integers(1100, 2**40)),
)
@HOSTILE
def test_declared_sizes_beyond_the_data_are_refused_before_reading(
    originals, base, monkeypatch, fmt, sizes
):
    """A header declaring billions of voxels in a file of a few hundred bytes is refused from
    the header alone: no voxel is read, no memory is allocated for them."""

    def no_read(self):
        raise AssertionError("the voxels were read (memory allocated) for an impossible header")

    monkeypatch.setattr(sitk.ImageFileReader, "Execute", no_read)
    files = dict(originals[fmt])
    name = FORMATS[fmt][0]
    data = gzip.decompress(files[name]) if fmt == "nii.gz" else files[name]
    if fmt.startswith("nii"):
        sizes = sizes[:2] + (min(sizes[2], 32767),)
        data = data[:42] + struct.pack("<3h", *sizes) + data[48:]
    elif fmt in NRRD_LIKE:
        data = re.sub(rb"^sizes: .*$", b"sizes: %d %d %d" % sizes, data, count=1, flags=re.M)
    else:
        data = re.sub(rb"^DimSize = .*$", b"DimSize = %d %d %d" % sizes, data, count=1, flags=re.M)
    files[name] = gzip.compress(data) if fmt == "nii.gz" else data
    with scratch(base) as folder:
        path = materialize(fmt, files, Path(folder))
        for reader in readers_for(fmt):
            outcome = attempt(lambda read=READERS[reader][0]: read(path))
            assert_clear(outcome, path)
            assert re.search(r"declares|truncated|cannot read", str(outcome)), outcome
