"""Atomic file writes: a synced temporary file in the same folder, renamed onto the target.

A crash or an exception at any moment leaves either the previous file or the new one, never a
partial file; the temporary file is removed when writing fails. A temporary file's name says
which process on which host wrote it (``.tmp-<host>-<pid>-<random>-<name>``): the next atomic
write into the same folder removes those of processes of this host that no longer exist (a
writer killed by SIGKILL, the out-of-memory killer or a power cut), never those of a running
process, of another host, or any other file.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from functools import cache
from pathlib import Path

from mtkd.errors import MTKDError

TEMPORARY_PREFIX = ".tmp-"
"""How the names of temporary files begin (a killed writer may leave one behind)."""


_TEMPORARY_NAME = re.compile(r"\.tmp-([0-9a-f]{8})-([1-9][0-9]{0,9})-[0-9a-f]{12}-.")


@cache
def _host_tag() -> str:
    """Eight hex digits naming this host in temporary file names: a hash of its name and, on
    Linux, of its process-id namespace (a container sees other process ids than its host)."""
    name = socket.gethostname()
    with suppress(OSError):
        name += os.readlink("/proc/self/ns/pid")
    return hashlib.sha256(name.encode("utf-8", "replace")).hexdigest()[:8]


def temporary_sibling(path: str | Path) -> Path:
    """A fresh hidden name next to ``path`` keeping its extension, naming this host and
    process: ``.tmp-<host>-<pid>-<hex>-name.nii.gz``."""
    path = Path(path)
    tag = f"{_host_tag()}-{os.getpid()}-{secrets.token_hex(6)}"
    return path.with_name(f"{TEMPORARY_PREFIX}{tag}-{path.name}")


def _process_is_gone(pid: int) -> bool:
    """True only when no process ``pid`` exists on this host (POSIX; elsewhere never)."""
    if os.name != "posix":
        return False
    try:
        os.kill(pid, 0)  # signal 0: an existence check, nothing is sent
    except ProcessLookupError:
        return True
    except (OSError, OverflowError, ValueError):  # another user's process, or a bad number
        return False
    return False


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files in ``folder`` that processes of this host left when they
    were killed (their process no longer exists); returns what was removed. Files of a
    running process, of another host, folders, links and other names are left alone."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY_NAME.match(entry.name)
        if not match or match.group(1) != _host_tag():
            continue
        with suppress(OSError):
            if entry.is_file(follow_symlinks=False) and _process_is_gone(int(match.group(2))):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
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

    The parent folder is created if needed, and cleared of the temporary files of killed
    writers (:func:`remove_stale_temporaries`). If the block raises, the temporary file is removed,
    ``path`` keeps its previous content and the exception propagates. If the block writes
    nothing, MTKDError is raised and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
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
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    with atomic_path(path) as temporary, open(temporary, "xb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())


def missing_folders(folder: str | Path) -> list[Path]:
    """``folder`` and the folders above it that do not exist yet, innermost first."""
    folder = Path(folder).absolute()
    return [path for path in (folder, *folder.parents) if not os.path.lexists(path)]


def remove_if_empty(folders: list[Path]) -> None:
    """Remove ``folders`` in order (innermost first) while each is empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


@contextmanager
def removed_if_left_empty(folder: str | Path) -> Iterator[None]:
    """On an exception in the block, remove ``folder`` and the folders above it that did not
    exist before, as far as they are empty (a failed command leaves no empty folder behind);
    the exception propagates."""
    created = missing_folders(folder)
    try:
        yield
    except BaseException:
        remove_if_empty(created)
        raise
