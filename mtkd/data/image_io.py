"""Reading and writing CT images and label maps, with checks that name the offending file.

Readers accept NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``,
``.mhd``) and a folder holding one DICOM series. Every problem a user can fix (missing or corrupt
file, wrong dimension, vector or complex pixels, NaN voxels, bad spacing, mismatched grids)
raises :class:`~mtkd.errors.MTKDError` naming the path. Headers are checked before any voxel is
read: a header that declares more voxel data than the file can hold (or more than
``MAX_VOXELS``) is refused before memory is allocated for it, and voxel spacings must be finite
and lie between ``SPACING_RANGE_MM`` (0.001 to 1000 mm). Images are SimpleITK images: index order
``(x, y, z)``; ``sitk.GetArrayFromImage`` gives numpy arrays of shape ``(z, y, x)``.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from mtkd.data import headers
from mtkd.data.atomic import atomic_path, atomic_write_bytes
from mtkd.data.headers import MAX_VOXELS
from mtkd.errors import MTKDError

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_VOXELS",
    "SPACING_RANGE_MM",
    "WRITE_SUFFIXES",
    "atomic_path",
    "atomic_write_bytes",
    "check_geometry",
    "check_same_grid",
    "check_writable",
    "checked_reader",
    "describe_grid",
    "dicom_series_ids",
    "expand_image_inputs",
    "itk_error_reason",
    "quiet_itk",
    "image_suffix",
    "read_image",
    "read_label",
    "strip_image_suffix",
    "write_image",
]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
"""File name endings the readers accept (longest first)."""
WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
"""File name endings the writer accepts: single-file formats only, so the write is atomic."""

SPACING_RANGE_MM = (1e-3, 1e3)
"""Voxel spacings (mm) outside this range are refused as implausible for a CT."""

_FLOAT_TYPES = (sitk.sitkFloat32, sitk.sitkFloat64)
_SPACING_TOL = 1e-3  # relative
_ORIGIN_TOL = 1e-3  # relative to max(1 mm, |coordinate|)
_DIRECTION_TOL = 1e-4  # absolute, on unit vectors


def image_suffix(path: str | Path) -> str | None:
    """The image-format ending of ``path`` (lower case, e.g. ``.nii.gz``), or None if unknown."""
    name = Path(path).name.lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), None)


def strip_image_suffix(name: str) -> str:
    """``case_01.nii.gz`` -> ``case_01``; names without a known ending are returned unchanged."""
    suffix = image_suffix(name)
    return name[: -len(suffix)] if suffix else name


def itk_error_reason(error: RuntimeError) -> str:
    """Turn SimpleITK's multi-line exception text into one short reason."""
    text = str(error)
    if "Zero-valued spacing" in text:
        return "the header gives a zero voxel spacing"
    if "Unable to determine ImageIO" in text or "Could not create IO object" in text:
        return "not a readable image (corrupt, truncated or of another format)"
    match = re.search(r"(?:ITK ERROR|itk::ERROR):\s*(.*)", text, flags=re.DOTALL)
    reason = match.group(1) if match else text
    reason = re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", reason.strip())
    reason = " ".join(reason.split())
    return reason[:300] or type(error).__name__


def _check_shape(size: tuple[int, ...], components: int, path: Path, pixel: str = "") -> None:
    """Dimension and pixel-type checks that can run on the header alone (``pixel``: SimpleITK's
    description of the pixel type, e.g. ``complex of 32-bit float``)."""
    if pixel.startswith("complex"):
        raise MTKDError(f"complex-valued image ({pixel}); a real-valued CT volume is needed", path)
    if components > 1:
        raise MTKDError(
            f"vector image with {components} components per voxel (RGB or multi-channel); "
            "a scalar 3-D volume is needed",
            path,
        )
    dims = len(size)
    shown = "x".join(map(str, size))
    if dims == 4 and size[3] == 1:
        return
    if dims == 4:
        raise MTKDError(
            f"4-D image ({shown}, {size[3]} volumes); a single 3-D volume is needed", path
        )
    if dims != 3:
        raise MTKDError(f"{dims}-D image ({shown}); a 3-D volume is needed", path)
    if min(size) == 0:
        axis = "xyz"[int(np.argmin(size))]
        raise MTKDError(f"image has no voxels along {axis} ({shown}); corrupt header?", path)
    if min(size) < 2:
        axis = "xyz"[int(np.argmin(size))]
        raise MTKDError(
            f"image has a single slice along {axis} ({shown}); a 3-D volume is needed", path
        )


def checked_reader(path: str | Path, scalar: bool = True) -> sitk.ImageFileReader:
    """An ``ImageFileReader`` for the image file ``path`` whose header passed every check that
    needs no voxel (format, spacing, size against the file, NIfTI fields; with ``scalar`` also
    a scalar 3-D volume): ``reader.Execute()`` then reads it. MTKDError naming the file."""
    path = Path(path)
    suffix = image_suffix(path)
    if suffix is None:
        raise MTKDError(f"unsupported file type; expected one of {', '.join(IMAGE_SUFFIXES)}", path)
    headers.check_text_header(path, suffix)
    if suffix in (".nii", ".nii.gz"):
        headers.check_nifti_header(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise MTKDError(
            f"cannot read image (corrupt, truncated or unsupported): {itk_error_reason(error)}",
            path,
        ) from None
    if scalar:
        pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
        _check_shape(reader.GetSize(), reader.GetNumberOfComponents(), path, pixel)
    headers.check_declared_size(reader, path, suffix)
    if suffix in (".nii", ".nii.gz"):
        headers.check_nifti_complete(reader, path, suffix)
    return reader


def _squeeze_4d(image: sitk.Image) -> sitk.Image:
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
    return image


def check_geometry(image: sitk.Image, path: str | Path) -> None:
    """MTKDError naming ``path`` unless ``image`` (3-D) has finite spacings within
    ``SPACING_RANGE_MM``, a finite non-degenerate direction matrix and a finite origin."""
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise MTKDError(f"zero, negative or invalid voxel spacing {tuple(spacing)}", path)
    low, high = SPACING_RANGE_MM
    if np.any(spacing < low) or np.any(spacing > high):
        shown = ", ".join(f"{v:g}" for v in spacing)
        raise MTKDError(
            f"implausible voxel spacing ({shown}) mm: a CT's spacing lies between {low:g} and "
            f"{high:g} mm (corrupt header, or a header in other units?)",
            path,
        )
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction)) < 1e-6:
        raise MTKDError("degenerate direction (orientation) matrix", path)
    if not np.all(np.isfinite(image.GetOrigin())):
        raise MTKDError("origin is not finite", path)


def _check_finite(image: sitk.Image, path: Path) -> None:
    """MTKDError counting the NaN and infinite voxels of a floating-point image, if any."""
    if image.GetPixelID() not in _FLOAT_TYPES:
        return
    array = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(array)
    if not finite.all():
        nan = int(np.isnan(array).sum())
        inf = int((~finite).sum()) - nan
        raise MTKDError(f"image has {nan} NaN and {inf} infinite voxels", path)


_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_DICOM_MAGIC_OFFSET = 128  # the "DICM" prefix follows a 128-byte preamble


@contextmanager
def quiet_itk() -> Iterator[None]:
    """ITK's own warnings off while reading (they go straight to standard error as multi-line
    ``WARNING: In .../itk....hxx`` text); the previous setting is restored afterwards. What a
    warning means is checked and reported by the caller as an MTKDError instead."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def dicom_series_ids(folder: str | Path) -> tuple[str, ...]:
    """The DICOM series UIDs of the files directly in ``folder`` (none: an empty tuple), without
    ITK's "No Series were found" warning on standard error."""
    with quiet_itk():
        try:
            return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
        except RuntimeError:
            return ()


def _looks_like_dicom(path: Path) -> bool:
    """A file meant as DICOM: a DICOM name ending, or the ``DICM`` mark after the preamble."""
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as stream:
            stream.seek(_DICOM_MAGIC_OFFSET)
            return stream.read(4) == b"DICM"
    except OSError:
        return False


def _unreadable_dicom_files(folder: Path, series: tuple[str, ...]) -> list[Path]:
    """Files of ``folder`` that look like DICOM but belong to no series: GDCM leaves out a
    truncated or corrupt slice without a word, which would read as a gap in the series."""
    members: set[str] = set()
    for uid in series:
        members.update(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
    members = {str(Path(name).resolve()) for name in members}
    candidates = sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.name.upper() != "DICOMDIR"
    )
    return [
        path
        for path in candidates
        if str(path.resolve()) not in members and _looks_like_dicom(path)
    ]


def _refuse_unreadable(folder: Path, bad: list[Path], readable: int) -> None:
    """MTKDError naming the unreadable DICOM file(s) of ``folder``, if any."""
    if not bad:
        return
    rest = f"; the series' other {readable} file(s) are readable" if readable else ""
    if len(bad) == 1:
        raise MTKDError(f"DICOM file is truncated or corrupt (not a readable image){rest}", bad[0])
    shown = ", ".join(path.name for path in bad[:5]) + (", ..." if len(bad) > 5 else "")
    raise MTKDError(
        f"{len(bad)} DICOM files are truncated or corrupt (not readable images): {shown}{rest}",
        folder,
    )


def _read_dicom_series(folder: Path) -> sitk.Image:
    with quiet_itk():
        series = dicom_series_ids(folder)
        files = (
            sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
            if len(series) == 1
            else ()
        )
        _refuse_unreadable(folder, _unreadable_dicom_files(folder, series), len(files))
        if not series:
            raise MTKDError(_no_series_problem(folder), folder)
        if len(series) > 1:
            raise MTKDError(
                f"folder holds {len(series)} DICOM series ({', '.join(series)}); "
                "put each series in its own folder",
                folder,
            )
        _check_even_slices(files, folder)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        try:
            return reader.Execute()
        except RuntimeError as error:
            bad = [Path(name) for name in files if not _slice_reads(name)]
            _refuse_unreadable(folder, bad, len(files) - len(bad))
            reason = itk_error_reason(error)
            raise MTKDError(f"cannot read DICOM series {series[0]} ({reason})", folder) from None


def _no_series_problem(folder: Path) -> str:
    """Why a folder read as a DICOM series holds none: empty, image files, or other files."""
    entries = [path for path in folder.iterdir() if not path.name.startswith(".")]
    if not entries:
        return "folder is empty: no image file or DICOM series to read"
    images = [path.name for path in entries if path.is_file() and image_suffix(path)]
    if images:
        return (
            f"folder holds image files ({', '.join(sorted(images)[:3])}"
            f"{', ...' if len(images) > 3 else ''}), not a DICOM series: name the file"
        )
    return "folder holds no DICOM series (and no image files)"


def _slice_reads(name: str) -> bool:
    """Whether ITK reads the DICOM file ``name`` on its own."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(name)
    try:
        reader.Execute()
    except RuntimeError:
        return False
    return True


def _slice_geometry(name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Image position and slice normal of one DICOM file; None without patient geometry."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(name)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise MTKDError("DICOM file is truncated or corrupt (not a readable image)", name) from None
    if not reader.HasMetaDataKey("0020|0032") or not reader.HasMetaDataKey("0020|0037"):
        return None
    try:
        position = np.array([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
        cosines = [float(v) for v in reader.GetMetaData("0020|0037").split("\\")]
    except ValueError:
        raise MTKDError(
            "unreadable image position or orientation (0020,0032 / 0020,0037)", name
        ) from None
    if position.size != 3 or len(cosines) != 6:
        raise MTKDError(
            "image position or orientation (0020,0032 / 0020,0037) has the wrong number of values",
            name,
        )
    return position, np.cross(cosines[:3], cosines[3:6])


def _check_even_slices(files: tuple[str, ...] | list[str], folder: Path) -> None:
    """Slices must be evenly spaced along the slice normal (1 % or 0.01 mm tolerance)."""
    if len(files) < 3:
        return
    positions, normal = [], None
    for name in files:
        geometry = _slice_geometry(name)
        if geometry is None:
            return  # no patient geometry: nothing to check against
        position, slice_normal = geometry
        normal = slice_normal if normal is None else normal
        positions.append(float(position @ normal))
    steps = np.diff(np.sort(positions))
    deviation = float(np.max(np.abs(steps - np.median(steps))))
    if deviation > max(0.01, 0.01 * float(np.median(steps))):
        raise MTKDError(
            f"DICOM slices are not evenly spaced: gaps deviate by up to {deviation:.2f} mm "
            f"from {float(np.median(steps)):.2f} mm (missing or extra slices?)",
            folder,
        )


def _read_file(path: Path) -> sitk.Image:
    """The image of a file whose header passed :func:`checked_reader`."""
    reader = checked_reader(path)
    if image_suffix(path) in (".nii", ".nii.gz"):
        headers.check_nifti_values(path)
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise MTKDError(
            f"cannot read image (corrupt, truncated or unsupported): {itk_error_reason(error)}",
            path,
        ) from None


def _read_volume(path: str | Path) -> tuple[sitk.Image, Path]:
    """Read a checked scalar 3-D volume in its stored pixel type."""
    path = Path(path)
    if not path.exists():
        raise MTKDError("file or folder not found", path)
    image = _read_dicom_series(path) if path.is_dir() else _read_file(path)
    pixel = sitk.GetPixelIDValueAsString(image.GetPixelID())
    _check_shape(image.GetSize(), image.GetNumberOfComponentsPerPixel(), path, pixel)
    image = _squeeze_4d(image)
    check_geometry(image, path)
    _check_finite(image, path)
    return image, path


_SMALL_INTEGER_TYPES = (sitk.sitkInt8, sitk.sitkUInt8, sitk.sitkInt16, sitk.sitkUInt16)


def read_image(path: str | Path, keep_integer: bool = False) -> sitk.Image:
    """Read a CT volume (file or DICOM series folder) as a checked 3-D float32 image (HU).

    Stored values are converted to float32 (64-bit integers may round); float64 values beyond
    float32's range raise MTKDError rather than turning infinite. With ``keep_integer`` an
    image stored as an integer of at most 16 bits keeps its type (half the memory of float32 or
    less; the predictor converts slab by slab).
    """
    image, path = _read_volume(path)
    if keep_integer and image.GetPixelID() in _SMALL_INTEGER_TYPES:
        return image
    if image.GetPixelID() == sitk.sitkFloat64:
        array = sitk.GetArrayViewFromImage(image)
        largest = float(np.abs(array).max()) if array.size else 0.0
        if largest > float(np.finfo(np.float32).max):
            raise MTKDError(f"voxel values up to {largest:g} do not fit 32-bit floats", path)
    return sitk.Cast(image, sitk.sitkFloat32)


def read_label(path: str | Path, reference: sitk.Image | None = None) -> sitk.Image:
    """Read a label map as UInt8 (values <= 255) or UInt16, checked like :func:`read_image`.

    Non-integer or negative values, or values above 65535, raise MTKDError. With ``reference``
    the map must lie on its grid (:func:`check_same_grid`).
    """
    image, path = _read_volume(path)
    array = sitk.GetArrayViewFromImage(image)
    if image.GetPixelID() in _FLOAT_TYPES:
        fractional = array != np.rint(array)
        if fractional.any():
            example = float(array[fractional].flat[0])
            raise MTKDError(
                f"label map has non-integer values (e.g. {example:g}); is this an image?", path
            )
    low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
    if low < 0:
        raise MTKDError(f"label map has negative values (down to {low})", path)
    if high > 65535:
        raise MTKDError(f"label values up to {high} do not fit 16 bits", path)
    pixel = sitk.sitkUInt8 if high <= 255 else sitk.sitkUInt16
    label = image if image.GetPixelID() == pixel else sitk.Cast(image, pixel)
    if reference is not None:
        check_same_grid(label, reference, path)
    return label


def describe_grid(image: sitk.Image) -> str:
    """One line: size, spacing, origin and direction of ``image``."""

    def fmt(values: tuple[float, ...]) -> str:
        return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"

    return (
        f"size {'x'.join(map(str, image.GetSize()))}, spacing {fmt(image.GetSpacing())}, "
        f"origin {fmt(image.GetOrigin())}, direction {fmt(image.GetDirection())}"
    )


def _grid_difference(image: sitk.Image, reference: sitk.Image) -> str | None:
    if image.GetSize() != reference.GetSize():
        return "size"
    spacing, ref_spacing = np.array(image.GetSpacing()), np.array(reference.GetSpacing())
    if np.any(np.abs(spacing - ref_spacing) > _SPACING_TOL * np.maximum(spacing, ref_spacing)):
        return "spacing"
    origin, ref_origin = np.array(image.GetOrigin()), np.array(reference.GetOrigin())
    scale = np.maximum(1.0, np.maximum(np.abs(origin), np.abs(ref_origin)))
    if np.any(np.abs(origin - ref_origin) > _ORIGIN_TOL * scale):
        return "origin"
    direction, ref_direction = np.array(image.GetDirection()), np.array(reference.GetDirection())
    if np.any(np.abs(direction - ref_direction) > _DIRECTION_TOL):
        return "direction"
    return None


def check_same_grid(image: sitk.Image, reference: sitk.Image, path: str | Path) -> None:
    """MTKDError naming both grids unless ``image`` lies on ``reference``'s voxel grid.

    Tolerances: spacing 1e-3 relative, origin 1e-3 of max(1 mm, |coordinate|), direction 1e-4.
    """
    if image.GetDimension() != reference.GetDimension():
        raise MTKDError(
            f"{image.GetDimension()}-D label map for a {reference.GetDimension()}-D image", path
        )
    differs = _grid_difference(image, reference)
    if differs is not None:
        raise MTKDError(
            f"label map grid differs from the image grid in {differs}: "
            f"label [{describe_grid(image)}] vs image [{describe_grid(reference)}]",
            path,
        )


def write_image(image: sitk.Image, path: str | Path) -> None:
    """Write ``image`` atomically to a ``.nii``, ``.nii.gz``, ``.nrrd`` or ``.mha`` file.

    Voxels and geometry are written, the metadata dictionary is not. If writing fails the
    previous file (if any) is kept and no temporary file is left behind.
    """
    if not isinstance(image, sitk.Image):
        raise TypeError(f"write_image needs a SimpleITK image, got {type(image).__name__}")
    path = Path(path)
    suffix = image_suffix(path)
    if suffix not in WRITE_SUFFIXES:
        raise MTKDError(
            f"cannot write this file type; use one of {', '.join(WRITE_SUFFIXES)}", path
        )
    if image.GetMetaDataKeys():
        image = sitk.Image(image)
        for key in image.GetMetaDataKeys():
            image.EraseMetaData(key)
    try:
        with atomic_path(path) as temporary:
            writer = sitk.ImageFileWriter()
            writer.SetFileName(str(temporary))
            writer.SetUseCompression(suffix != ".nii")
            writer.Execute(image)
    except RuntimeError as error:
        raise MTKDError(f"cannot write image: {itk_error_reason(error)}", path) from None
    except OSError as error:
        raise MTKDError(f"cannot write image: {error.strerror or error}", path) from None


def expand_image_inputs(paths: list[str | Path]) -> list[Path]:
    """Image files and DICOM series folders named by ``paths``, a folder of image files
    expanding to its images (sorted by name; hidden files such as the temporary files of
    atomic writes, ``.tmp-*``, or macOS's ``._*`` are skipped)."""
    images: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise MTKDError("image file or folder not found", path)
        if path.is_dir():
            inside = sorted(
                p
                for p in path.iterdir()
                if p.is_file() and image_suffix(p) and not p.name.startswith(".")
            )
            images.extend(inside or [path])  # no image files: a DICOM series folder
        else:
            images.append(path)
    return images


def check_writable(path: str | Path) -> Path:
    """Make sure a file can be written at ``path``, before any work, creating nothing: it is
    not a folder and its nearest existing folder accepts a new file (the write itself makes
    the missing folders, so a command that fails leaves no empty folder behind)."""
    path = Path(path)
    try:
        if path.is_dir():
            raise MTKDError("cannot write output here (a folder has this name)", path)
        folder = path.parent
        while not (folder.exists() or folder.is_symlink()) and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise MTKDError(f"cannot write output here ({folder} is not a folder)", path)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".mtkd-write-check-"):
            pass
    except OSError as error:
        raise MTKDError(f"cannot write output here ({error.strerror or error})", path) from None
    return path
