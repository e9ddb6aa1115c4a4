"""Zips of models (MONAI bundles, library imports), extracted only after every member passed.

A member with an absolute path, a drive, a ``..`` component, a symbolic link or no file name
refuses the whole zip (:func:`safe_extract`), and so do sizes that break
:func:`check_zip_sizes` (a zip bomb); a failed extraction removes what it wrote.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath

from mtkd.errors import MTKDError, error_summary

# The largest supported network (a SwinUNETR teacher) has about 10^8 parameters, 0.4 GB as
# float32; a bundle may hold it in two or three forms (model.pt, model.ts, model.onnx).
MAX_ZIP_MEMBER = 2 << 30  # bytes, unpacked, of one member
MAX_ZIP_TOTAL = 4 << 30  # bytes, unpacked, of all the members extracted
MAX_ZIP_RATIO = 100  # unpacked / packed size of a member above 1 MiB (weights pack ~1:1)
_RATIO_FREE = 1 << 20


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why zip member ``info`` may not be extracted (escapes the target, a link, no name), or
    None."""
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or PurePosixPath(name).is_absolute():
        return "has an absolute path"
    if PureWindowsPath(info.filename).drive or re.match(r"^[A-Za-z]:", name):
        return "names a drive"
    if ".." in name.split("/"):
        return "climbs out with '..'"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "is a symbolic link"
    if "\x00" in name:
        return "has a NUL character in its name"
    if not info.is_dir() and not [p for p in name.split("/") if p not in ("", ".")]:
        return "has no file name"
    return None


def _unwrite(written: list[Path]) -> None:
    """Remove the files and folders (listed in creation order) of a failed extraction."""
    for path in reversed(written):
        try:
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink()
        except OSError:
            pass


def _makedirs(folder: Path, written: list[Path]) -> None:
    """``folder.mkdir(parents=True, exist_ok=True)``, listing each folder it creates."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
        written.append(path)


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.1f} GiB" if size >= 1 << 30 else f"{size / (1 << 20):.1f} MiB"


def check_zip_sizes(members: list[zipfile.ZipInfo], zip_path: Path) -> None:
    """MTKDError naming ``zip_path`` if ``members`` would unpack to more than
    :data:`MAX_ZIP_TOTAL` in all, a member to more than :data:`MAX_ZIP_MEMBER`, or a member
    above 1 MiB to more than :data:`MAX_ZIP_RATIO` times its packed size (a zip bomb)."""
    total = 0
    for info in members:
        size = info.file_size
        if size > MAX_ZIP_MEMBER:
            raise MTKDError(
                f"refused to extract: member {info.filename!r} would unpack to {_gib(size)} "
                f"(more than {_gib(MAX_ZIP_MEMBER)})",
                zip_path,
            )
        if size > _RATIO_FREE and size > MAX_ZIP_RATIO * max(info.compress_size, 1):
            raise MTKDError(
                f"refused to extract: member {info.filename!r} would unpack to {_gib(size)} from "
                f"{info.compress_size} bytes (more than {MAX_ZIP_RATIO} times; a zip bomb?)",
                zip_path,
            )
        total += size
    if total > MAX_ZIP_TOTAL:
        raise MTKDError(
            f"refused to extract: it would unpack to {_gib(total)} (more than "
            f"{_gib(MAX_ZIP_TOTAL)})",
            zip_path,
        )


def safe_extract(
    zip_path: str | Path, target: str | Path, keep: Callable[[str], bool] | None = None
) -> Path:
    """Extract ``zip_path`` into ``target`` (created if needed) and return ``target``.

    ``keep`` (given a member's name with ``/`` separators) selects the members to extract; by
    default all. Every member is checked before anything is written: an absolute path, a
    drive, a ``..`` component, a symbolic link or a file without a name refuses the whole zip,
    and so do members to extract whose sizes break :func:`check_zip_sizes` (MTKDError naming
    it). A member that cannot be written or decompressed (damaged data, an unsupported
    compression, encryption, clashing names) refuses it too, and what was written is removed.
    """
    zip_path, target = Path(zip_path), Path(target)
    try:
        archive = zipfile.ZipFile(zip_path)
    except Exception as error:  # noqa: BLE001 - a damaged directory fails in many ways
        raise MTKDError(f"not a readable zip file ({error_summary(error)})", zip_path) from None
    with archive:
        members = archive.infolist()
        for info in members:
            problem = _member_problem(info)
            if problem:
                raise MTKDError(f"refused to extract: member {info.filename!r} {problem}", zip_path)
        if keep is not None:
            members = [info for info in members if keep(info.filename.replace("\\", "/"))]
        check_zip_sizes(members, zip_path)
        root = target.resolve()
        plan = []
        for info in members:
            parts = [p for p in info.filename.replace("\\", "/").split("/") if p not in ("", ".")]
            destination = root.joinpath(*parts) if parts else root
            if os.path.commonpath([root, destination.resolve()]) != str(root):
                raise MTKDError(
                    f"refused to extract: member {info.filename!r} lands outside the target",
                    zip_path,
                )
            plan.append((info, destination))
        written: list[Path] = []
        member = None
        try:
            _makedirs(root, written)
            for member, destination in plan:
                if member.is_dir():
                    _makedirs(destination, written)
                    continue
                _makedirs(destination.parent, written)
                existed = destination.exists()
                with archive.open(member) as source, open(destination, "wb") as sink:
                    if not existed:
                        written.append(destination)
                    shutil.copyfileobj(source, sink, 1 << 20)
        except Exception as error:  # noqa: BLE001 - zipfile fails in many ways on a damaged zip
            _unwrite(written)
            where = f"member {member.filename!r}" if member is not None else "the target folder"
            raise MTKDError(
                f"refused to extract: {where} cannot be written or read ({error_summary(error)})",
                zip_path,
            ) from None
    return target
