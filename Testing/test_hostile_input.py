"""Hostile and broken input, property-based (hypothesis): corrupted, truncated and extreme image
files for the readers (NIfTI, NRRD, MetaImage, Slicer ``.seg.nrrd``, dataset cases) and for
``mtkd segment``; code-running pickles, escaping or damaged zips and SHA-256 mismatches for
the model loaders. Each case ends in a correct result or in an MTKDError whose message names
the file and the problem: never another exception, never a hang.

Example-based tests of the same areas, not repeated here: test_data_io (a truncated file,
random bytes, 2-D/4-D/vector images, NaN voxels, zero spacing, label grids),
test_bundle.test_code_in_weights_is_refused_and_not_run,
test_bundle.test_unsafe_zip_members_are_refused_before_writing,
test_bundle.test_tampered_weights_are_refused,
test_library.test_zip_escaping_its_folder_is_refused_and_writes_nothing,
test_library.test_tampered_weights_are_refused and
test_engine_loop.test_init_from_a_missing_or_tampered_model_is_refused.
"""

from __future__ import annotations

import faulthandler
import gzip
import json
import math
import os
import re
import shutil
import signal
import struct
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mtkd.cli import main
from mtkd.data.datasets import load_dataset
from mtkd.data.image_io import MAX_VOXELS, SPACING_RANGE_MM, read_image, read_label
from mtkd.data.labels import LabelTable
from mtkd.data.loading import read_case
from mtkd.data.preprocess import Preprocessing
from mtkd.data.segnrrd import read_seg_nrrd, write_seg_nrrd
from mtkd.errors import MTKDError
from mtkd.library import ModelLibrary
from mtkd.modelfiles.bundle import load_bundle, safe_extract
from mtkd.modelfiles.checkpoint import load_checkpoint
from mtkd.modelfiles.files import sha256_of
from mtkd.modelfiles.model_io import LoadedModel, build_from_spec, export_model, load_model
from mtkd.modelfiles.sources import load_any_model

# Reproducible in CI (the same examples on every run), bounded, no per-example deadline (the
# no_hang guard below catches hangs), no example database written into the source tree.
HOSTILE = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
HANG_SECONDS = 60


class Hang(BaseException):
    """Raised into a call that ran past its time (a BaseException: no ``except Exception``
    in the code under test can swallow it)."""


@contextmanager
def no_hang(seconds: float = HANG_SECONDS) -> Iterator[None]:
    """Fail instead of hanging: after ``seconds`` SIGALRM raises :class:`Hang` into Python
    code; a hang inside C code (ITK, zlib, torch) ends the process with every thread's stack
    dumped (faulthandler) after twice that, so CI fails instead of blocking."""
    faulthandler.dump_traceback_later(2 * seconds + 5, exit=True, file=sys.__stderr__)
    previous = None
    if hasattr(signal, "setitimer"):

        def expire(signum, frame):
            raise Hang(f"no result after {seconds} s")

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        if previous is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        faulthandler.cancel_dump_traceback_later()


def attempt(call: Callable[[], object]) -> object:
    """``call()``'s result or the MTKDError it raised; any other exception fails the test."""
    with no_hang():
        try:
            return call()
        except MTKDError as error:
            return error


def assert_clear(error: object, path: Path, *words: str) -> None:
    """``error`` is an MTKDError on one line that names ``path``'s file and a problem."""
    assert isinstance(error, MTKDError), f"expected an MTKDError, got {error!r}"
    message = str(error)
    assert "\n" not in message.strip(), message
    assert path.name in message, message
    assert error.problem.strip(), message
    for word in words:
        assert word.lower() in message.lower(), message


def scratch(base: Path):
    """A fresh folder for one example, removed after it."""
    return tempfile.TemporaryDirectory(dir=base)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile")


# --- valid originals ---------------------------------------------------------------------------

SHAPE = (6, 5, 4)  # numpy (z, y, x): 4x5x6 voxels
SPACING = (0.8, 0.9, 2.5)
ORIGIN = (-10.0, 20.5, 30.25)
_C, _S = math.cos(0.5), math.sin(0.5)
DIRECTION = (_C, -_S, 0.0, _S, _C, 0.0, 0.0, 0.0, 1.0)
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


def reference_image() -> sitk.Image:
    """A tiny int16 volume (values 0..1399: a CT and a label map alike) with a rotated
    direction and non-trivial geometry."""
    values = (np.arange(np.prod(SHAPE)).reshape(SHAPE) * 37 % 1400).astype(np.int16)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    return image


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


def assert_sane(image: sitk.Image, label: bool) -> None:
    """What every image a reader returns must satisfy, whatever the file held."""
    assert image.GetDimension() == 3 and min(image.GetSize()) >= 2
    assert math.prod(image.GetSize()) <= MAX_VOXELS
    spacing = np.array(image.GetSpacing())
    assert np.all(np.isfinite(spacing)), spacing
    assert np.all(spacing >= SPACING_RANGE_MM[0]) and np.all(spacing <= SPACING_RANGE_MM[1])
    direction = np.array(image.GetDirection()).reshape(3, 3)
    assert np.all(np.isfinite(direction)) and abs(np.linalg.det(direction)) > 1e-6
    assert np.all(np.isfinite(image.GetOrigin()))
    assert image.GetNumberOfComponentsPerPixel() == 1
    if label:
        assert image.GetPixelID() in (sitk.sitkUInt8, sitk.sitkUInt16)
    else:
        assert image.GetPixelID() == sitk.sitkFloat32
        assert np.all(np.isfinite(sitk.GetArrayViewFromImage(image)))


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


# --- mtkd segment end to end ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_ct(data_dir, base) -> Path:
    """A small crop of the bundled real CT (NIfTI)."""
    image = sitk.ReadImage(str(data_dir / "abdomen_ct.nii.gz"))
    path = base / "small_ct.nii.gz"
    sitk.WriteImage(sitk.RegionOfInterest(image, [24, 20, 8], [40, 30, 70]), str(path))
    return path


def segment(model: Path, image: Path, output: Path, capsys) -> tuple[int, str]:
    """``mtkd segment`` in this process: its exit status and what it wrote to stderr."""
    capsys.readouterr()
    with no_hang():
        code = main(["segment", str(model), str(image), "-o", str(output), "--device", "cpu"])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, error: str, path: Path, *words: str) -> None:
    assert code == 2, (code, error)
    assert "Traceback" not in error, error
    lines = error.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtkd: error:"), error
    assert str(path) in lines[0], error
    for word in words:
        assert word.lower() in lines[0].lower(), error


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


# --- model files ---------------------------------------------------------------------------------


class RunsCode:
    """Pickles to ``os.makedirs(marker)``: unpickling it with code allowed creates the marker."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def wrap(payload: object, layers: list[str]) -> object:
    """``payload`` nested in containers (innermost first) as a state_dict might hold it."""
    for layer in layers:
        if layer == "list":
            payload = [torch.zeros(1), payload]
        elif layer == "tuple":
            payload = (payload,)
        elif layer == "dict":
            payload = {"weight": torch.ones(2), "extra": payload}
        else:
            payload = {"model": payload, "format": 1}
    return payload


def copy_model(teacher_run: Path, folder: Path) -> Path:
    return Path(shutil.copytree(teacher_run / "model", folder / "model"))


def record_sha(model: Path) -> None:
    """Make the metadata's SHA-256 match model.pt, so a refusal cannot come from the checksum."""
    metadata = json.loads((model / "mtkd_model.json").read_text())
    metadata["weights_sha256"] = sha256_of(model / "model.pt")
    (model / "mtkd_model.json").write_text(json.dumps(metadata))


def test_the_pickle_payload_is_live(tmp_path):
    """The payload the next test uses does run code when pickle is allowed to."""
    marker = tmp_path / "ran"
    torch.save(wrap(RunsCode(str(marker)), ["dict"]), tmp_path / "x.pt")
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.is_dir()


@settings(HOSTILE, max_examples=20)
@given(
    layers=st.lists(st.sampled_from(["list", "tuple", "dict", "state"]), max_size=3),
    where=st.sampled_from(["model folder", "checkpoint", "library"]),
)
def test_code_running_pickles_are_refused(teacher_run, base, layers, where):
    """A weights file or checkpoint holding an object whose unpickling would run code (at any
    depth) is refused by every loader, and the code never runs (weights-only loading)."""
    with scratch(base) as folder:
        folder = Path(folder)
        marker = folder / "code-ran"
        payload = wrap(RunsCode(str(marker)), layers)
        if where == "checkpoint":
            path = folder / "last.pt"
            metadata = json.loads((teacher_run / "model" / "mtkd_model.json").read_text())
            torch.save({"format": 1, "model": payload, "model_metadata": metadata}, path)
            calls = [lambda: load_checkpoint(path), lambda: load_any_model(path)]
        else:
            model = copy_model(teacher_run, folder)
            path = model / "model.pt"
            torch.save(payload, path)
            record_sha(model)
            library = ModelLibrary(folder / "library")
            if where == "library":
                calls = [lambda: library.import_model(model)]
            else:
                calls = [lambda: load_model(model), lambda: load_any_model(model)]
        for call in calls:
            outcome = attempt(call)
            assert_clear(outcome, model if where == "library" else path)
            assert not marker.exists(), "the pickle ran code"
        if where == "library":
            assert library.entries() == []


@settings(HOSTILE, max_examples=30)
@given(
    where=st.sampled_from(["model folder", "checkpoint"]),
    damage=st.one_of(
        st.tuples(st.just("truncate"), st.floats(0.0, 1.0, exclude_max=True), st.just(b"")),
        st.tuples(
            st.just("overwrite"),
            st.floats(0.0, 1.0, exclude_max=True),
            st.binary(min_size=1, max_size=16),
        ),
    ),
)
def test_damaged_weights_and_checkpoints_fail_clearly(teacher_run, base, where, damage):
    """A weights file or checkpoint cut short or overwritten (its SHA-256 recorded anew, so
    the bytes themselves are judged): MTKDError naming the file, or a loaded model."""
    kind, fraction, replacement = damage
    with scratch(base) as folder:
        folder = Path(folder)
        if where == "checkpoint":
            path = folder / "last.pt"
            shutil.copy(teacher_run / "checkpoints" / "last.pt", path)
        else:
            model = copy_model(teacher_run, folder)
            path = model / "model.pt"
        data = bytearray(path.read_bytes())
        start = int(len(data) * fraction)
        if kind == "truncate":
            data = data[:start]
        else:
            data[start : start + len(replacement)] = replacement
        path.write_bytes(bytes(data))
        if where == "checkpoint":
            outcome = attempt(lambda: load_any_model(path))
        else:
            record_sha(model)
            outcome = attempt(lambda: load_any_model(model))
        if isinstance(outcome, MTKDError):
            assert_clear(outcome, path)
        else:
            assert isinstance(outcome, LoadedModel)


NOT_A_STATE_DICT = st.one_of(
    st.integers(),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=3),
    st.builds(torch.zeros, st.integers(0, 3)),
    st.dictionaries(st.integers(), st.builds(torch.zeros, st.integers(0, 2)), max_size=2),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5) | st.none(), max_size=2),
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
METADATA_KEYS = ["network", "labels", "preprocessing", "activation", "format"]


@settings(HOSTILE, max_examples=30)
@given(
    change=st.one_of(
        st.tuples(st.just("weights"), NOT_A_STATE_DICT),
        st.tuples(st.just("metadata"), JSON),
        st.tuples(st.just("metadata bytes"), st.binary(max_size=40)),  # e.g. not UTF-8
        st.tuples(st.sampled_from(METADATA_KEYS), JSON | st.just("DELETE")),
    )
)
def test_model_metadata_and_weights_of_the_wrong_shape(teacher_run, base, change):
    """A model folder (its SHA-256 recorded) whose weights hold no state_dict of named tensors,
    whose metadata is not a JSON object, or whose network, labels, preprocessing, activation
    or format is missing or any JSON value: MTKDError naming the weights or the metadata file,
    or a loaded model."""
    what, value = change
    with scratch(base) as folder:
        model = copy_model(teacher_run, Path(folder))
        metadata_file = model / "mtkd_model.json"
        if what == "weights":
            torch.save(value, model / "model.pt")
            record_sha(model)
            named = model / "model.pt"
        else:
            metadata = json.loads(metadata_file.read_text())
            if what == "metadata bytes":
                metadata = None
            elif what == "metadata":
                metadata = value
            elif value == "DELETE":
                metadata.pop(what, None)
            else:
                metadata[what] = value
            if what == "metadata bytes":
                metadata_file.write_bytes(value)
            else:
                metadata_file.write_text(json.dumps(metadata))
            named = metadata_file
        for call in (lambda: load_model(model), lambda: load_any_model(model)):
            outcome = attempt(call)
            event("refused" if isinstance(outcome, MTKDError) else "loaded")
            if isinstance(outcome, MTKDError):
                assert_clear(outcome, named if what == "weights" else model)
            else:
                assert isinstance(outcome, LoadedModel)


@pytest.fixture(scope="module")
def written_bundle(teacher_run, base, small_ct) -> Path:
    """The tiny teacher written as a MONAI bundle of ours (its metadata records the SHA-256)."""
    from mtkd.export.bundle import write_bundle

    folder = base / "bundle"
    write_bundle(load_model(teacher_run), folder, read_image(small_ct))
    return folder


@settings(HOSTILE, max_examples=20)
@given(
    change=st.one_of(
        st.tuples(
            st.just("overwrite"),
            st.floats(0, 1, exclude_max=True),
            st.binary(min_size=1, max_size=8),
        ),
        st.tuples(st.just("append"), st.just(0.0), st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True), st.just(b"")),
        st.tuples(
            st.just("recorded"),
            st.just(0.0),
            st.text("0123456789abcdef", min_size=64, max_size=64).map(str.encode),
        ),  # noqa: E501
    ),
    where=st.sampled_from(["model folder", "library folder", "library zip", "bundle"]),
)
def test_sha256_mismatch_is_refused(teacher_run, written_bundle, base, change, where):
    """Weights that differ from the SHA-256 their metadata records (changed, extended, cut, or
    a different checksum recorded) are refused by the model loader, the library import (of a
    folder or a zip) and the bundle loader, naming the weights file."""
    kind, fraction, data = change
    with scratch(base) as folder:
        folder = Path(folder)
        if where == "bundle":
            model = Path(shutil.copytree(written_bundle, folder / "bundle"))
            weights = model / "models" / "model.pt"
            metadata_file = model / "configs" / "metadata.json"
        else:
            model = copy_model(teacher_run, folder)
            weights, metadata_file = model / "model.pt", model / "mtkd_model.json"
        before = weights.read_bytes()
        if kind == "recorded":
            metadata = json.loads(metadata_file.read_text())
            section = metadata["mtkd"] if where == "bundle" else metadata
            if data.decode() == section["weights_sha256"]:
                return  # the one draw that is not a mismatch
            section["weights_sha256"] = data.decode()
            metadata_file.write_text(json.dumps(metadata))
        else:
            body = bytearray(before)
            start = int(len(body) * fraction)
            if kind == "overwrite":
                body[start : start + len(data)] = data
            elif kind == "append":
                body += data
            else:
                body = body[:start]
            if bytes(body) == before:
                return  # overwritten with the same bytes: nothing to detect
            weights.write_bytes(bytes(body))
        library = ModelLibrary(folder / "library")
        if where == "model folder":
            outcomes = [attempt(lambda: load_model(model)), attempt(lambda: load_any_model(model))]
        elif where == "library folder":
            outcomes = [attempt(lambda: library.import_model(model))]
        elif where == "library zip":
            archive = folder / "model.zip"
            with zipfile.ZipFile(archive, "w") as zipped:
                for file in model.iterdir():
                    zipped.write(file, f"model/{file.name}")
            outcomes = [attempt(lambda: library.import_model(archive))]
        else:
            outcomes = [attempt(lambda: load_bundle(model))]
        for outcome in outcomes:
            assert_clear(outcome, weights, "SHA-256")
        assert library.entries() == []


# --- zips ----------------------------------------------------------------------------------------

SEGMENTS = st.one_of(
    st.sampled_from(["..", ".", "", "...", "..a", "a..", "~", "C:", " ", "-"]),
    st.text("ab._- ", min_size=1, max_size=4),
)
LEADS = ["", "", "/", "//", "\\", "C:/", "c:\\", "D:", "./", "../", "\\\\server\\share\\"]
TARGET_DEPTH = 8  # the target lies this deep in the sandbox: '..' cannot leave the sandbox


def _member_name(lead: str, parts: list[str], separator: str, box: Path) -> str:
    if lead in ("/", "//"):
        lead = f"{box}/outside/"  # an absolute path into the sandbox, never the real root
    return lead + separator.join(parts)


def _escapes(name: str, link: bool, directory: bool) -> bool:
    """Whether ``name`` must be refused: absolute, a drive, a '..' component, a link, or a
    file without a name (the rules a safe extractor needs, written out independently)."""
    unified = name.replace("\\", "/")
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    return (
        link
        or unified.startswith("/")
        or re.match(r"^[A-Za-z]:", unified) is not None
        or ".." in unified.split("/")
        or (not directory and not parts)
    )


def _snapshot(box: Path, skip: Path | None = None) -> set[str]:
    return {
        str(p.relative_to(box))
        for p in box.rglob("*")
        if skip is None or (p != skip and skip not in p.parents)
    }


@settings(HOSTILE, max_examples=100)
@given(
    lead=st.sampled_from(LEADS),
    parts=st.lists(SEGMENTS, min_size=1, max_size=4),
    separator=st.sampled_from(["/", "\\"]),
    link=st.sampled_from([False, False, False, True]),
    directory=st.booleans(),
)
def test_zip_members_never_land_outside_the_target(base, lead, parts, separator, link, directory):
    """A zip member named with absolute paths, drives, '..', '.', empty parts or backslashes,
    or stored as a symbolic link: refused naming the zip with nothing written anywhere, or (a
    harmless name) extracted inside the target; never a file outside it."""
    with scratch(base) as folder:
        box = Path(folder)
        target = box.joinpath(*[f"d{i}" for i in range(TARGET_DEPTH)], "target")
        target.parent.mkdir(parents=True)
        name = _member_name(lead, parts, separator, box) + ("/" if directory else "")
        assume(name != "")  # zipfile cannot even write a member without a name
        archive = box / "model.zip"
        with zipfile.ZipFile(archive, "w") as zipped:
            zipped.writestr("ok/file.txt", "inside")
            info = zipfile.ZipInfo(name)
            if link:
                info.external_attr = (0o120777) << 16
            zipped.writestr(info, "" if directory else "payload")
        with zipfile.ZipFile(archive) as zipped:
            stored = zipped.infolist()[-1]
        before = _snapshot(box)
        outcome = attempt(lambda: safe_extract(archive, target))
        if _escapes(stored.filename, link, stored.is_dir()):
            assert_clear(outcome, archive, "refused to extract")
            assert _snapshot(box) == before  # nothing written, inside or out
            return
        assert not isinstance(outcome, MTKDError), outcome
        assert _snapshot(box, skip=target) == before
        assert (target / "ok" / "file.txt").read_text() == "inside"
        parts = [p for p in stored.filename.replace("\\", "/").split("/") if p not in ("", ".")]
        landed = target.joinpath(*parts)
        if stored.is_dir():
            assert landed.is_dir()
        else:
            assert landed.read_text() == "payload"


@settings(HOSTILE, max_examples=12)
@given(
    lead=st.sampled_from(["../", "/", "C:/", "model/../../", "\\..\\"]),
    rest=st.text("ab._", min_size=1, max_size=6),
    where=st.sampled_from(["library", "bundle"]),
)
def test_library_and_bundle_refuse_escaping_zips(
    teacher_run, written_bundle, base, lead, rest, where
):
    """The library import and the bundle loader refuse a model zip with one escaping member
    (besides the real model files), naming the zip; nothing is written outside, the library
    stays empty."""
    with scratch(base) as folder:
        box = Path(folder)
        source = teacher_run / "model" if where == "library" else written_bundle
        archive = box / "model.zip"
        name = (f"{box}/outside/" if lead == "/" else lead) + rest
        with zipfile.ZipFile(archive, "w") as zipped:
            for file in sorted(source.rglob("*")):
                if file.is_file():
                    zipped.write(file, file.relative_to(source).as_posix())
            zipped.writestr(name, "payload")
        library = ModelLibrary(box / "library")
        target = box / "extracted"
        before = _snapshot(box)
        if where == "library":
            outcome = attempt(lambda: library.import_model(archive))
        else:
            outcome = attempt(lambda: load_bundle(archive, extract_to=target))
        assert_clear(outcome, archive, "refused to extract")
        assert _snapshot(box, skip=box / "library") == before
        assert library.entries() == []


@settings(HOSTILE, max_examples=60)
@given(position=st.floats(0, 1, exclude_max=True), value=st.integers(0, 255))
def test_damaged_zips_are_refused_or_extracted_intact(base, position, value):
    """A zip with one byte changed anywhere (data, CRC, sizes, compression method, flags,
    names, central directory): MTKDError naming it with nothing left behind, or an extraction
    inside the target of files holding the original contents."""
    contents = {"ok/file.txt": b"inside " * 50, "ok/weights.bin": bytes(range(256)) * 4}
    with scratch(base) as folder:
        box = Path(folder)
        archive = box / "model.zip"
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zipped:
            for name, data in contents.items():
                zipped.writestr(name, data)
        data = bytearray(archive.read_bytes())
        data[int(position * len(data))] = value
        archive.write_bytes(bytes(data))
        target = box / "deep" / "target"
        target.parent.mkdir()
        before = _snapshot(box)
        outcome = attempt(lambda: safe_extract(archive, target))
        if isinstance(outcome, MTKDError):
            assert_clear(outcome, archive)
            assert _snapshot(box) == before
            return
        assert _snapshot(box, skip=target) == before
        for file in target.rglob("*"):
            if file.is_file():
                assert file.read_bytes() in contents.values()
