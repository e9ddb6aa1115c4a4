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
    "expand_image_inputs",
    "itk_error_reason",
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


def _read_dicom_series(folder: Path) -> sitk.Image:
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError:
        series = ()
    if not series:
        raise MTKDError("folder holds no DICOM series", folder)
    if len(series) > 1:
        raise MTKDError(
            f"folder holds {len(series)} DICOM series ({', '.join(series)}); "
            "put each series in its own folder",
            folder,
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        reason = itk_error_reason(error)
        raise MTKDError(f"cannot read DICOM series {series[0]} ({reason})", folder) from None
    _check_even_slices(files, folder)
    return image


def _check_even_slices(files: tuple[str, ...] | list[str], folder: Path) -> None:
    """Slices must be evenly spaced along the slice normal (1 % or 0.01 mm tolerance)."""
    if len(files) < 3:
        return
    positions, normal = [], None
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        reader.ReadImageInformation()
        if not reader.HasMetaDataKey("0020|0032") or not reader.HasMetaDataKey("0020|0037"):
            return  # no patient geometry: nothing to check against
        position = np.array([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
        if normal is None:
            cosines = [float(v) for v in reader.GetMetaData("0020|0037").split("\\")]
            normal = np.cross(cosines[:3], cosines[3:6])
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
    expanding to its images (sorted by name)."""
    images: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise MTKDError("image file or folder not found", path)
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.is_file() and image_suffix(p))
            images.extend(inside or [path])  # no image files: a DICOM series folder
        else:
            images.append(path)
    return images


def check_writable(path: str | Path) -> Path:
    """Create ``path``'s folder and make sure a file can be written there, before any work."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".mtkd-write-check-"):
            pass
    except OSError as error:
        raise MTKDError(f"cannot write output here ({error.strerror or error})", path) from None
    return path
