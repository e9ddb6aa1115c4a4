"""One writer at a time for a folder: a lock file holding who writes it.

``FolderLock(folder, purpose)`` is a context manager around everything that writes the folder
(a run folder: train, distill, resume; an ablation folder; a dataset folder that cases are
added to). ``FOLDER/.mtkd.lock`` holds, as JSON, the holder's pid, host, start time, command
and purpose. A second writer gets :class:`FolderLocked` (an MTKDError naming the folder and
the holder) and writes nothing; ``FolderLock(folder, purpose).acquire(timeout=10)`` waits up
to 10 s for a live holder first (for short writes, e.g. two Slicer sessions adding cases).

- **Atomic**: the lock is written in full to a temporary file and hard-linked to its name
  (``os.link`` fails if the name exists), so there is no moment where two processes both think
  they won, nor one where a reader sees a half-written lock. Where the file system has no hard
  links, ``O_CREAT | O_EXCL`` is used.
- **Released** when the block ends, also on exceptions, KeyboardInterrupt and a stop by
  SIGINT/SIGTERM (the run ends through its stop handling, :mod:`mtkd.engine.signals`).
- **Stale locks** (the holder was killed: SIGKILL, a crash, a power loss) are recovered when the
  holder ran on this host and is dead: its pid is gone, a zombie, or a later process that
  reused the pid (Linux: the process start time differs), or this machine restarted since
  (Linux boot id). Two processes recovering the same stale lock at once are serialised by an
  OS lock (``flock``/``msvcrt.locking``) on a file in this host's temporary folder, and the
  stale lock is removed only if it is still the one found stale; then both race on the atomic
  link and one wins.
- A lock **from another host** (a shared folder) is never broken: its pid cannot be checked
  from here. The error names that host and the lock file to delete once nothing there uses the
  folder.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from mtkd.data.atomic import fsync_dir
from mtkd.errors import MTKDError
from mtkd.processes import pid_exists

__all__ = ["LOCK_NAME", "FolderLock", "FolderLocked", "LockHolder", "check_unlocked", "holder_of"]

LOCK_NAME = ".mtkd.lock"
_TEMPORARY_SUFFIX = ".tmp"
_ORPHAN_SECONDS = 3600.0  # a lock's temporary file this old was left by a killed process
_FRESH_SECONDS = 5.0  # an unreadable lock this young may still be being written (O_EXCL)
_ATTEMPTS = 20
_HELD_HERE: dict[Path, str] = {}  # lock file -> token, for the locks this process holds


@dataclass(frozen=True)
class LockHolder:
    """Who holds a folder's lock (the content of the lock file)."""

    pid: int
    host: str
    since: float  # seconds since the epoch
    command: str
    purpose: str
    token: str  # unique per acquisition
    process_start: int | None = None  # Linux: /proc/<pid>/stat starttime (clock ticks)
    boot_id: str | None = None  # Linux: /proc/sys/kernel/random/boot_id

    def describe(self) -> str:
        """``pid 123 on host gpu1 since 2025-01-01 12:00:00 (mtkd distill: python -m ...)``."""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return (
            f"pid {self.pid} on host {self.host} since {since} "
            f"({self.purpose}: {self.command or 'command unknown'})"
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> LockHolder:
        """Parse a lock file's text (ValueError if it is not one)."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        try:
            holder = cls(
                pid=int(data["pid"]),
                host=str(data["host"]),
                since=float(data["since"]),
                command=str(data.get("command", "")),
                purpose=str(data.get("purpose", "")),
                token=str(data["token"]),
                process_start=_optional_int(data.get("process_start")),
                boot_id=data.get("boot_id") if isinstance(data.get("boot_id"), str) else None,
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"missing or wrong field {error}") from None
        return holder

    @property
    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool:
        """Whether the holder still runs (only meaningful when it is on this host)."""
        if self.boot_id and _boot_id() and self.boot_id != _boot_id():
            return False  # this machine restarted since the lock was taken
        if self.pid == os.getpid():
            # this process: alive only if it holds the lock now (else a pid reused after a
            # restart, e.g. in a container, or a lock this process failed to remove)
            return self.token in _HELD_HERE.values()
        return _process_alive(self.pid, self.process_start)


class FolderLocked(MTKDError):
    """The folder is locked by another process (``holder``; None when the lock is unreadable)."""

    def __init__(self, message: str, folder: Path, holder: LockHolder | None):
        super().__init__(message, folder)
        self.holder = holder


class FolderLock:
    """Context manager: hold ``FOLDER/.mtkd.lock`` while writing ``folder`` (created if
    missing). ``purpose`` says what the holder does ("mtkd distill --resume", "MTKD Train"),
    for the message another writer gets."""

    def __init__(self, folder: str | Path, purpose: str, command: str | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.purpose = purpose
        self.command = _command_line() if command is None else command
        self.holder: LockHolder | None = None  # set while held

    @property
    def held(self) -> bool:
        return self.holder is not None

    def acquire(self, timeout: float = 0.0) -> FolderLock:
        """Take the lock; FolderLocked if a live process (or one on another host) holds it
        for longer than ``timeout`` seconds (default: do not wait; a short wait suits short
        writes such as adding a case to a dataset folder)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._acquire_once()
            except FolderLocked as error:
                if error.holder is None or time.monotonic() >= deadline:
                    raise
            time.sleep(0.1)

    def _acquire_once(self) -> FolderLock:
        if self.held:
            raise RuntimeError(f"{self.path} is already held by this FolderLock")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise MTKDError(f"cannot create the folder ({error.strerror})", self.folder) from None
        if not self.folder.is_dir():
            raise MTKDError("not a folder", self.folder)
        mine = LockHolder(
            pid=os.getpid(),
            host=socket.gethostname(),
            since=time.time(),
            command=self.command,
            purpose=self.purpose,
            token=secrets.token_hex(16),
            process_start=_process_start(os.getpid()),
            boot_id=_boot_id(),
        )
        for _ in range(_ATTEMPTS):
            try:
                created = self._create(mine)
            except OSError as error:
                raise MTKDError(
                    f"cannot write the lock file {LOCK_NAME} here ({error.strerror})", self.folder
                ) from None
            if created:
                self.holder = mine
                _HELD_HERE[self.path] = mine.token
                self._remove_orphans()
                return self
            current = self._read()
            if current is None:
                continue  # removed meanwhile, or still being written: try again
            if not current.on_this_host:
                raise FolderLocked(
                    f"this folder is locked by a process on another machine, "
                    f"{current.describe()}; if nothing on {current.host} uses it any more, "
                    f"delete {self.path} and try again",
                    self.folder,
                    current,
                )
            if current.alive():
                raise FolderLocked(
                    f"this folder is in use by {current.describe()}; wait until it ends or "
                    "stop it, then try again",
                    self.folder,
                    current,
                )
            self._break_stale(current)
        raise MTKDError(  # pragma: no cover - only under a storm of competing writers
            f"could not take the lock {self.path} after {_ATTEMPTS} attempts", self.folder
        )

    def release(self) -> None:
        """Remove the lock if this process still holds it (idempotent)."""
        holder, self.holder = self.holder, None
        if holder is None:
            return
        _HELD_HERE.pop(self.path, None)
        with contextlib.suppress(OSError, ValueError):
            if LockHolder.from_json(self.path.read_text(encoding="utf-8")).token == holder.token:
                self.path.unlink()

    def __enter__(self) -> FolderLock:
        """Take the lock (``with FolderLock(...).acquire(timeout=5):`` waits first)."""
        return self if self.held else self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    # ----------------------------------------------------------------- internals
    def _create(self, holder: LockHolder) -> bool:
        """Create the lock file with ``holder``'s content atomically; False if it exists."""
        temporary = self.folder / f"{LOCK_NAME}.{holder.token}{_TEMPORARY_SUFFIX}"
        data = holder.to_json().encode()
        try:
            _write_synced(temporary, data, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            try:
                os.link(temporary, self.path)
                return True
            except FileExistsError:
                return False
            except OSError as error:  # no hard links here (FAT, some network shares)
                if error.errno == errno.EEXIST:
                    return False
            try:
                _write_synced(self.path, data, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                return False
            return True
        finally:
            with contextlib.suppress(OSError):
                temporary.unlink()

    def _read(self) -> LockHolder | None:
        """The current holder; None if the lock is gone or is still being written. An
        unreadable lock older than a few seconds is an error naming the file."""
        for _ in range(50):
            try:
                text = self.path.read_text(encoding="utf-8")
                return LockHolder.from_json(text)
            except FileNotFoundError:
                return None
            except (OSError, ValueError, UnicodeDecodeError) as error:
                problem = error
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return None
            if age > _FRESH_SECONDS:
                raise FolderLocked(
                    f"the lock file {self.path} is unreadable ({problem}); if no MTKD process "
                    "uses this folder, delete it and try again",
                    self.folder,
                    None,
                )
            time.sleep(0.1)
        return None  # pragma: no cover - a lock written for more than 5 s

    def _break_stale(self, stale: LockHolder) -> None:
        """Remove the lock of the dead ``stale`` holder, unless it was replaced meanwhile.
        Breakers of one folder are serialised by a host-local OS lock (stale locks are only
        broken on the holder's own host, so a host-local one is enough)."""
        with _host_mutex(self.folder):
            try:
                current = LockHolder.from_json(self.path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                return
            except (OSError, ValueError, UnicodeDecodeError):
                return  # replaced by a lock being written: the next attempt reads it
            if current.token == stale.token:
                self.path.unlink()
                fsync_dir(self.folder)

    def _remove_orphans(self) -> None:
        """Delete temporary lock files that killed processes left (older than an hour)."""
        now = time.time()
        for path in self.folder.glob(f"{LOCK_NAME}.*{_TEMPORARY_SUFFIX}"):
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > _ORPHAN_SECONDS:
                    path.unlink()


def holder_of(folder: str | Path) -> LockHolder | None:
    """Who holds ``folder``'s lock now (None: no lock, or an unreadable one)."""
    try:
        return LockHolder.from_json((Path(folder) / LOCK_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def check_unlocked(folder: str | Path, purpose: str = "check") -> None:
    """FolderLocked if another process holds ``folder``'s lock now; a stale lock is removed.
    For a front end's early message: the writer itself still takes the lock."""
    folder = Path(folder)
    if (folder / LOCK_NAME).exists():
        with FolderLock(folder, purpose):
            pass


# --------------------------------------------------------------- process identity
def _command_line() -> str:
    """This process's command line, shortened to ``python -m mtkd ...`` for the engine."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name == "__main__.py":
        argv[:1] = ["python", "-m", Path(argv[0]).parent.name]
    return shlex.join(argv) if argv else ""


def _optional_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _proc_stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (Linux), None elsewhere."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _process_start(pid: int) -> int | None:
    """Linux: when process ``pid`` started, in clock ticks after boot (None elsewhere)."""
    fields = _proc_stat_fields(pid)
    try:
        return int(fields[19]) if fields else None  # field 22 of /proc/<pid>/stat
    except (IndexError, ValueError):
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _process_alive(pid: int, process_start: int | None) -> bool:
    """Whether ``pid`` runs on this host and is the same process (Linux: same start time; a
    zombie counts as dead)."""
    if not pid_exists(pid):
        return False
    fields = _proc_stat_fields(pid)
    if fields is None:
        return True  # no /proc (macOS): the pid exists
    if fields and fields[0] == "Z":
        return False  # ended, not yet reaped by its parent
    return process_start is None or _process_start(pid) == process_start


# ------------------------------------------------------------------ file helpers
def _write_synced(path: Path, data: bytes, flags: int) -> None:
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _host_mutex(folder: Path) -> Iterator[None]:
    """An OS lock, on this host, for one folder (by device and inode, so that two paths to
    the same folder share it); released by the OS if the process dies."""
    info = folder.stat()
    key = hashlib.sha256(f"{info.st_dev}:{info.st_ino}".encode()).hexdigest()
    path = Path(tempfile.gettempdir()) / f"mtkd-lock-break-{key[:24]}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # created by another user: a read-only handle can be locked
        fd = os.open(path, os.O_RDONLY)
    try:
        if sys.platform == "win32":  # pragma: no cover - Windows only
            import msvcrt

            while True:
                try:
                    msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
                    break
                except OSError:  # LK_LOCK gives up after 10 s: keep waiting
                    continue
            try:
                yield
            finally:
                os.lseek(fd, 0, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
