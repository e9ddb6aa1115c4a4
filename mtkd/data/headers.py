"""Checks of an image file's header before any voxel is read.

ITK reads many damaged headers without complaint: it replaces zero, negative or infinite
spacings, reads a NIfTI with a damaged magic as Analyze, drops a qform holding NaN, and
allocates whatever size a header declares. These functions refuse such files with an
:class:`~mtkd.errors.MTKDError` naming the file, each for the formats it names (NIfTI, NRRD,
MetaImage); :func:`mtkd.data.image_io.checked_reader` runs them in order.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from mtkd.errors import MTKDError

__all__ = [
    "MAX_VOXELS",
    "check_declared_size",
    "check_nifti_complete",
    "check_nifti_header",
    "check_nifti_values",
    "check_text_header",
]

MAX_VOXELS = 1 << 32
"""Largest number of voxel values (voxels x components) a header may declare."""
_DEFLATE_RATIO = 1032  # deflate (gzip, zlib) never expands data more than 1032-fold
_SLACK = 1 << 20  # bytes added to size bounds (stream headers, rounding)
_NIFTI_MAGIC = {1: b"n+1\x00", 2: b"n+2\x00"}
_NIFTI_MIN_OFFSET = {1: 352, 2: 544}


def _numbers(text: str) -> list[float]:
    values = []
    for token in re.split(r"[\s,()]+", text.strip()):
        try:
            values.append(float(token))
        except ValueError:
            continue
    return values


def check_text_header(path: Path, suffix: str) -> None:
    """Reject zero, negative or non-finite spacings, which ITK silently replaces (by their
    absolute value), reports as zero or replaces by 1 (an NRRD ``space directions`` vector whose
    length underflows or overflows), and (MetaImage) a NaN or infinite origin or direction,
    which ITK reads as 0. NRRD's ``nan`` marks a non-spatial axis and is allowed there."""
    if suffix not in (".mha", ".mhd", ".nrrd", ".nhdr"):
        return
    with open(path, "rb") as stream:
        head = stream.read(65536).decode("latin-1")
    if suffix in (".mha", ".mhd"):
        header = head.split("ElementDataFile", 1)[0]
        pattern = r"^\s*(?:ElementSpacing|ElementSize)\s*=\s*(.+)$"
        geometry = (
            r"^\s*(?:Offset|Origin|Position|TransformMatrix|Rotation|Orientation)\s*=\s*(.+)$"
        )
        for match in re.finditer(geometry, header, flags=re.MULTILINE):
            if not all(math.isfinite(v) for v in _numbers(match.group(1))):
                raise MTKDError(
                    f"NaN or infinite origin or orientation in the header ({match.group(0)})",
                    path,
                )
    else:
        header = re.split(r"\r?\n\r?\n", head, maxsplit=1)[0]
        pattern = r"^spacings:\s*(.+)$"
        for match in re.finditer(r"^space directions:\s*(.+)$", header, flags=re.MULTILINE):
            for vector in re.findall(r"\(([^)]*)\)", match.group(1)):
                squares = sum(v * v for v in _numbers(vector))  # what ITK's spacing is made of
                if not 0 < squares < math.inf:
                    raise MTKDError(
                        "zero, non-finite or overflowing voxel spacing in the header "
                        f"(space directions vector ({vector.strip()}))",
                        path,
                    )
    for match in re.finditer(pattern, header, flags=re.MULTILINE):
        values = _numbers(match.group(1))
        if suffix in (".nrrd", ".nhdr"):
            values = [v for v in values if not math.isnan(v)]
        if any(not math.isfinite(v) or v <= 0 for v in values):
            raise MTKDError(
                f"zero, negative or non-finite voxel spacing in the header ({match.group(0)})",
                path,
            )


def _raw_nifti_header(path: Path) -> dict | None:
    """The stored NIfTI-1 or -2 header fields ITK silently repairs (either byte order):
    ``version``, ``dims`` (dim[0..7]), ``pixdim`` (pixdim[0..7]), ``vox_offset``, ``magic``,
    ``codes`` (qform_code, sform_code), ``qform`` (quatern_b..qoffset_z), ``sform`` (srow_*).

    None when the file is too short or not gzip-readable (ITK then reports it); MTKDError when
    the header-size field is neither 348 nor 540 (ITK would guess and read it anyway).
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as stream:
            head = stream.read(540)
    except (OSError, EOFError, zlib.error):
        return None
    if len(head) < 4:
        return None
    for order in "<>":
        size = struct.unpack(order + "i", head[:4])[0]
        if size == 348 and len(head) >= 348:
            return {
                "version": 1,
                "dims": list(struct.unpack(order + "8h", head[40:56])),
                "pixdim": list(struct.unpack(order + "8f", head[76:108])),
                "vox_offset": struct.unpack(order + "f", head[108:112])[0],
                "magic": head[344:348],
                "codes": struct.unpack(order + "2h", head[252:256]),
                "qform": struct.unpack(order + "6f", head[256:280]),
                "sform": struct.unpack(order + "12f", head[280:328]),
            }
        if size == 540 and len(head) >= 540:
            return {
                "version": 2,
                "dims": list(struct.unpack(order + "8q", head[16:80])),
                "pixdim": list(struct.unpack(order + "8d", head[104:168])),
                "vox_offset": struct.unpack(order + "q", head[168:176])[0],
                "magic": head[4:8],
                "codes": struct.unpack(order + "2i", head[344:352]),
                "qform": struct.unpack(order + "6d", head[352:400]),
                "sform": struct.unpack(order + "12d", head[400:496]),
            }
        if size in (348, 540):
            return None  # a header cut short: ITK reports the truncation
    raise MTKDError(
        "cannot read image: not a NIfTI file (header size field is "
        f"{struct.unpack('<i', head[:4])[0]}, expected 348 or 540)",
        path,
    )


def check_nifti_header(path: Path) -> None:
    """Header checks ITK cannot make: it reads a file with a damaged magic as Analyze (losing
    the orientation), moves a bad ``vox_offset``, replaces a zero or infinite pixdim by 1 and
    drops a qform or sform holding NaN or infinity (silently moving the image to the origin)."""
    raw = _raw_nifti_header(path)
    if raw is None:
        return
    version = raw["version"]
    if raw["magic"] != _NIFTI_MAGIC[version]:
        raise MTKDError(
            f"cannot read image: not a single-file NIfTI-{version} (magic {raw['magic']!r}, "
            f"expected {_NIFTI_MAGIC[version]!r}); corrupt header?",
            path,
        )
    offset = raw["vox_offset"]
    if not math.isfinite(offset) or offset < _NIFTI_MIN_OFFSET[version]:
        raise MTKDError(
            f"cannot read image: invalid vox_offset {offset:g} in the header (at least "
            f"{_NIFTI_MIN_OFFSET[version]} for NIfTI-{version}); corrupt header?",
            path,
        )
    for name, code, values in zip(("qform", "sform"), raw["codes"], (raw["qform"], raw["sform"])):
        if code > 0 and not all(math.isfinite(v) for v in values):
            raise MTKDError(
                f"NaN or infinite origin or orientation in the header ({name}); corrupt header?",
                path,
            )
    dims, pixdim = raw["dims"], raw["pixdim"]
    for axis in range(1, min(dims[0], 3) + 1):
        if not (math.isfinite(pixdim[axis]) and pixdim[axis] > 0):
            raise MTKDError(
                "zero, negative or non-finite voxel spacing in the header "
                f"(pixdim[{axis}] = {pixdim[axis]:g})",
                path,
            )


def check_nifti_values(path: Path) -> None:
    """ITK reads NaN/Inf voxels of some NIfTI files as 0; nibabel takes a second look."""
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


def check_nifti_complete(reader: sitk.ImageFileReader, path: Path, suffix: str) -> None:
    """ITK reads a truncated NIfTI without complaint; compare the data size with the header's
    (a ``.nii.gz`` first against what its compressed size can hold at most)."""
    try:
        ndim = int(reader.GetMetaData("dim[0]"))
        dims = [max(1, int(reader.GetMetaData(f"dim[{i}]"))) for i in range(1, ndim + 1)]
        bitpix = int(reader.GetMetaData("bitpix"))
        offset = int(float(reader.GetMetaData("vox_offset")))
    except (RuntimeError, ValueError):
        return
    raw = _raw_nifti_header(path)
    if raw is not None:  # ITK's copy of a large vox_offset may have wrapped around
        offset = int(raw["vox_offset"])
    expected = offset + math.prod(dims) * bitpix // 8
    if suffix == ".nii":
        actual = os.path.getsize(path)
    else:
        most = os.path.getsize(path) * _DEFLATE_RATIO + _SLACK
        if expected > most:
            raise MTKDError(
                f"file is truncated or its header is corrupt: the header declares {expected} "
                f"bytes, the compressed file can hold at most {most}",
                path,
            )
        with open(path, "rb") as stream:
            stream.seek(-4, os.SEEK_END)
            if int.from_bytes(stream.read(4), "little") == expected % (1 << 32):
                return
        actual = _gunzipped_size(path)
    if actual < expected:
        raise MTKDError(f"file is truncated ({actual} of {expected} bytes)", path)


def _text_header(path: Path, suffix: str) -> tuple[dict[str, str], int] | None:
    """The fields of an NRRD or MetaImage header (keys lower case) and the byte offset where
    attached voxel data would start; None if the header is not found in the first 64 KiB."""
    with open(path, "rb") as stream:
        head = stream.read(65536)
    fields: dict[str, str] = {}
    offset = 0
    for line in head.splitlines(keepends=True):
        offset += len(line)
        text = line.decode("latin-1").strip()
        if suffix in (".nrrd", ".nhdr"):
            if not text:
                return fields, offset  # the blank line ending an NRRD header
            key, colon, value = text.partition(":")
            if colon and not value.startswith("=") and not key.startswith("#"):
                fields[key.strip().lower()] = value.strip()
        else:
            key, equals, value = text.partition("=")
            if equals:
                fields[key.strip().lower()] = value.strip()
            if key.strip().lower() == "elementdatafile":
                return fields, offset  # MetaImage: the last header line
    if suffix == ".nhdr" and len(head) < 65536:
        return fields, offset  # a detached header may end without a blank line
    return None


def _data_capacity(path: Path, suffix: str, value_bytes: int) -> int | None:
    """The most bytes of voxel data an NRRD or MetaImage file (with its data file) can hold
    once decoded, or None where that cannot be bounded (file lists, bzip2, unknown fields)."""
    parsed = _text_header(path, suffix)
    if parsed is None:
        return None
    fields, offset = parsed
    if suffix in (".nrrd", ".nhdr"):
        encoding = fields.get("encoding", "raw").lower()
        data_file = fields.get("data file", fields.get("datafile"))
        compressed = encoding in ("gzip", "gz")
        if encoding not in ("raw", "gzip", "gz", "ascii", "text", "txt", "hex"):
            return None
    else:
        encoding = "raw"
        data_file = fields.get("elementdatafile")
        compressed = fields.get("compresseddata", "false").lower() == "true"
        if data_file is not None and data_file.upper() == "LOCAL":
            data_file = None
    if data_file is None:
        size = os.path.getsize(path) - offset
    else:
        if data_file.upper().startswith("LIST") or len(data_file.split()) > 1:
            return None  # one file per slice
        location = Path(data_file)
        location = location if location.is_absolute() else path.parent / location
        if not location.is_file():
            return None  # ITK names the missing data file
        size = os.path.getsize(location)
    size = max(size, 0)
    if compressed:
        return size * _DEFLATE_RATIO + _SLACK
    if encoding in ("ascii", "text", "txt"):
        return (size // 2 + 1) * value_bytes  # a number and a separator per value
    if encoding == "hex":
        return size // 2
    return size


def check_declared_size(reader: sitk.ImageFileReader, path: Path, suffix: str) -> None:
    """Refuse, before ITK allocates memory for it, a header that declares more than
    ``MAX_VOXELS`` values or more voxel data than its file can hold (a truncated file, or a
    corrupt or hostile header such as 100000^3 voxels in a few bytes)."""
    size = reader.GetSize()
    values = math.prod(size) * max(1, reader.GetNumberOfComponents())
    shown = "x".join(map(str, size))
    if values > MAX_VOXELS:
        raise MTKDError(
            f"the header declares {shown} voxels ({values} values), more than the "
            f"{MAX_VOXELS} MTKD reads; corrupt header?",
            path,
        )
    if suffix not in (".nrrd", ".nhdr", ".mha", ".mhd"):
        return  # NIfTI: check_nifti_complete
    bits = re.search(r"(\d+)-bit", sitk.GetPixelIDValueAsString(reader.GetPixelID()))
    value_bytes = int(bits.group(1)) // 8 if bits else 1
    capacity = _data_capacity(path, suffix, value_bytes)
    declared = values * value_bytes
    if capacity is not None and declared > capacity:
        raise MTKDError(
            f"file is truncated or its header is corrupt: the header declares {shown} voxels "
            f"({declared} bytes), the file holds at most {capacity} bytes of voxel data",
            path,
        )
