"""Asking a run to stop at its next safe point (it saves a checkpoint first).

Two ways, the same on every OS for the file: SIGINT/SIGTERM (a terminal's Ctrl+C, POSIX
``kill``), or a stop-request file, ``<run folder>/STOP``, which a front end without a console
shared with the run (Slicer on Windows, another machine on a shared folder) creates. A run
removes, when it starts, a stop file older than its launch (left over from an earlier run), and
removes any stop file when it ends, so an old request never stops the next run, while a Stop
pressed during the run's start-up (before it reads the file) still stops it. The launch time is
``$MTKD_LAUNCHED_AT`` (seconds since the epoch, set by the front end that starts the process),
else the moment this module was imported.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

STOP_FILE_NAME = "STOP"
LAUNCHED_AT_ENV = "MTKD_LAUNCHED_AT"
_IMPORTED_AT = time.time()


def launch_time(environ: dict[str, str] | None = None) -> float:
    """When this process was launched: ``$MTKD_LAUNCHED_AT`` when set to a number, else when
    this module was imported (seconds since the epoch)."""
    value = (os.environ if environ is None else environ).get(LAUNCHED_AT_ENV, "")
    try:
        return float(value)
    except ValueError:
        return _IMPORTED_AT


def stop_file(run_dir: str | Path) -> Path:
    """The stop-request file of the run folder ``run_dir``."""
    return Path(run_dir) / STOP_FILE_NAME


def request_stop(run_dir: str | Path) -> Path:
    """Ask the run in ``run_dir`` to stop at its next safe point (creates its stop file)."""
    path = stop_file(run_dir)
    path.write_text("stop requested\n", encoding="utf-8")
    return path


class StopRequest:
    """Context manager: while active, SIGINT/SIGTERM set ``requested`` instead of killing.

    ``requested`` is also true once the stop file ``stop_path`` exists (checked each time it
    is read, at the run's safe points). With ``clear=True`` a stop file older than
    ``launched_at`` (default :func:`launch_time`) is removed on entering (a request left from an
    earlier run) and any stop file on leaving. A second SIGINT raises
    KeyboardInterrupt at once. Outside the main thread (where Python cannot install
    handlers) only ``request()`` and the stop file work.
    """

    def __init__(
        self,
        stop_path: str | Path | None = None,
        clear: bool = True,
        launched_at: float | None = None,
    ) -> None:
        self.stop_path = Path(stop_path) if stop_path is not None else None
        self.clear = clear
        self.launched_at = launch_time() if launched_at is None else launched_at
        self.signal_name: str | None = None
        self._requested = False
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        if not self._requested and self.stop_path is not None and self.stop_path.exists():
            self.request(f"stop file {self.stop_path}")
        return self._requested

    def request(self, name: str = "request") -> None:
        self._requested = True
        self.signal_name = name

    def _handle(self, signum: int, _frame: object) -> None:
        if self._requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.request(signal.Signals(signum).name)

    def _remove_stop_file(self, written_before: float | None = None) -> None:
        if not self.clear or self.stop_path is None:
            return
        with contextlib.suppress(OSError):
            if written_before is None or self.stop_path.stat().st_mtime < written_before:
                self.stop_path.unlink(missing_ok=True)

    def __enter__(self) -> StopRequest:
        self._remove_stop_file(written_before=self.launched_at)
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        self._remove_stop_file()
