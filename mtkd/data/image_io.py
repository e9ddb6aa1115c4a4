"""Reading and writing CT images and label maps, with checks that name the offending file.

Readers accept NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``,
``.mhd``) and a folder holding one DICOM series. Every problem a user can fix (missing or corrupt
file, wrong dimension, vector pixels, NaN voxels, bad spacing, mismatched grids) raises
:class:`~mtkd.errors.MTKDError` naming the path. Images are SimpleITK images: index order
``(x, y, z)``; ``sitk.GetArrayFromImage`` gives numpy arrays of shape ``(z, y, x)``.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import struct
import tempfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from mtkd.data.atomic import atomic_path, atomic_write_bytes
from mtkd.errors import MTKDError

__all__ = [
    "IMAGE_SUFFIXES",
    "WRITE_SUFFIXES",
    "atomic_path",
    "atomic_write_bytes",
    "check_same_grid",
    "check_writable",
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


def _numbers(text: str) -> list[float]:
    values = []
    for token in re.split(r"[\s,()]+", text.strip()):
        try:
            values.append(float(token))
        except ValueError:
            continue
    return values


def _check_text_header_spacing(path: Path, suffix: str) -> None:
    """Reject non-positive spacings that ITK would silently replace by their absolute value."""
    if suffix not in (".mha", ".mhd", ".nrrd", ".nhdr"):
        return
    with open(path, "rb") as stream:
        head = stream.read(65536).decode("latin-1")
    if suffix in (".mha", ".mhd"):
        header = head.split("ElementDataFile", 1)[0]
        pattern = r"^\s*(?:ElementSpacing|ElementSize)\s*=\s*(.+)$"
    else:
        header = re.split(r"\r?\n\r?\n", head, maxsplit=1)[0]
        pattern = r"^spacings:\s*(.+)$"
    for match in re.finditer(pattern, header, flags=re.MULTILINE):
        values = [v for v in _numbers(match.group(1)) if not np.isnan(v)]
        if any(v <= 0 for v in values):
            raise MTKDError(
                f"zero or negative voxel spacing in the header ({match.group(0)})", path
            )


def _raw_nifti_header(path: Path) -> tuple[list[int], list[float]] | None:
    """``dim[0..7]`` and ``pixdim[0..7]`` as stored (NIfTI-1 or -2, either byte order)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as stream:
            head = stream.read(540)
    except (OSError, EOFError, zlib.error):
        return None
    for order in "<>":
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348:
            return list(struct.unpack(order + "8h", head[40:56])), list(
                struct.unpack(order + "8f", head[76:108])
            )
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540:
            return list(struct.unpack(order + "8q", head[16:80])), list(
                struct.unpack(order + "8d", head[104:168])
            )
    return None


def _check_nifti_header(path: Path) -> None:
    """Checks ITK cannot make: it sets zero pixdim to 1 and reads NaN/Inf voxels as 0."""
    raw = _raw_nifti_header(path)
    if raw is None:
        return
    dims, pixdim = raw
    for axis in range(1, min(dims[0], 3) + 1):
        if not pixdim[axis] > 0:
            raise MTKDError(
                f"zero or negative voxel spacing in the header (pixdim[{axis}] = {pixdim[axis]:g})",
                path,
            )
    try:
        nifti = nib.load(str(path))
        floating = np.issubdtype(nifti.header.get_data_dtype(), np.floating)
    except Exception:  # ITK read the file; nibabel's second look is optional
        return
    if floating:
        data = np.asanyarray(nifti.dataobj)
        finite = np.isfinite(data)
        if not finite.all():
            nan = int(np.isnan(data).sum())
            raise MTKDError(
                f"image has {nan} NaN and {int((~finite).sum()) - nan} infinite voxels", path
            )


def _gunzipped_size(path: Path) -> int:
    """Uncompressed size of a gzip file; MTKDError if the stream is truncated or corrupt."""
    total = 0
    try:
        with gzip.open(path, "rb") as stream:
            while block := stream.read(1 << 22):
                total += len(block)
    except (EOFError, OSError, zlib.error) as error:
        raise MTKDError(f"compressed data is truncated or corrupt ({error})", path) from None
    return total


def _check_nifti_complete(reader: sitk.ImageFileReader, path: Path, suffix: str) -> None:
    """ITK reads a truncated NIfTI without complaint; compare the data size with the header's."""
    try:
        ndim = int(reader.GetMetaData("dim[0]"))
        dims = [max(1, int(reader.GetMetaData(f"dim[{i}]"))) for i in range(1, ndim + 1)]
        bitpix = int(reader.GetMetaData("bitpix"))
        offset = int(float(reader.GetMetaData("vox_offset")))
    except (RuntimeError, ValueError):
        return
    expected = offset + math.prod(dims) * bitpix // 8
    if suffix == ".nii":
        actual = os.path.getsize(path)
    else:
        with open(path, "rb") as stream:
            stream.seek(-4, os.SEEK_END)
            if int.from_bytes(stream.read(4), "little") == expected % (1 << 32):
                return
        actual = _gunzipped_size(path)
    if actual < expected:
        raise MTKDError(f"file is truncated ({actual} of {expected} bytes)", path)


def _check_shape(size: tuple[int, ...], components: int, path: Path) -> None:
    """Dimension and pixel-type checks that can run on the header alone."""
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
    if min(size) < 2:
        axis = "xyz"[int(np.argmin(size))]
        raise MTKDError(
            f"image has a single slice along {axis} ({shown}); a 3-D volume is needed", path
        )


def _squeeze_4d(image: sitk.Image) -> sitk.Image:
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
    return image


def _check_geometry(image: sitk.Image, path: Path) -> None:
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise MTKDError(f"zero, negative or invalid voxel spacing {tuple(spacing)}", path)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction)) < 1e-6:
        raise MTKDError("degenerate direction (orientation) matrix", path)
    if not np.all(np.isfinite(image.GetOrigin())):
        raise MTKDError("origin is not finite", path)


def _check_finite(image: sitk.Image, path: Path) -> None:
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
    suffix = image_suffix(path)
    if suffix is None:
        raise MTKDError(f"unsupported file type; expected one of {', '.join(IMAGE_SUFFIXES)}", path)
    _check_text_header_spacing(path, suffix)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        _check_shape(reader.GetSize(), reader.GetNumberOfComponents(), path)
        if suffix in (".nii", ".nii.gz"):
            _check_nifti_complete(reader, path, suffix)
            _check_nifti_header(path)
        image = reader.Execute()
    except RuntimeError as error:
        raise MTKDError(
            f"cannot read image (corrupt, truncated or unsupported): {itk_error_reason(error)}",
            path,
        ) from None
    return image


def _read_volume(path: str | Path) -> tuple[sitk.Image, Path]:
    """Read a checked scalar 3-D volume in its stored pixel type."""
    path = Path(path)
    if not path.exists():
        raise MTKDError("file or folder not found", path)
    image = _read_dicom_series(path) if path.is_dir() else _read_file(path)
    _check_shape(image.GetSize(), image.GetNumberOfComponentsPerPixel(), path)
    image = _squeeze_4d(image)
    _check_geometry(image, path)
    _check_finite(image, path)
    return image, path


def read_image(path: str | Path) -> sitk.Image:
    """Read a CT volume (file or DICOM series folder) as a checked 3-D float32 image (HU)."""
    image, _ = _read_volume(path)
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
