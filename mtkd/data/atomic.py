"""Atomic file writes: a synced temporary file in the same folder, renamed onto the target.

A crash or an exception at any moment leaves either the previous file or the new one, never a
partial file; the temporary file is removed when writing fails.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from mtkd.errors import MTKDError

TEMPORARY_PREFIX = ".tmp-"
"""How the names of temporary files begin (a killed writer may leave one behind)."""


def temporary_sibling(path: str | Path) -> Path:
    """A fresh hidden name next to ``path`` keeping its extension: ``.tmp-<hex>-name.nii.gz``."""
    path = Path(path)
    return path.with_name(f"{TEMPORARY_PREFIX}{secrets.token_hex(6)}-{path.name}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable; a no-op where folders cannot be opened (Windows)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    with suppress(OSError):
        path.unlink()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed onto ``path``.

    The parent folder is created if needed. If the block raises, the temporary file is removed,
    ``path`` keeps its previous content and the exception propagates. If the block writes
    nothing, MTKDError is raised and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(path)
    try:
        yield temporary
        if not temporary.is_file():
            raise MTKDError("nothing was written (no temporary file was created)", path)
        _fsync_file(temporary)
        os.replace(temporary, path)
    except BaseException:
        _remove_quietly(temporary)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    with atomic_path(path) as temporary, open(temporary, "xb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
