"""Asking a run to stop at its next safe point (it saves a checkpoint first).

Two ways, the same on every OS for the file: SIGINT/SIGTERM (a terminal's Ctrl+C, POSIX
``kill``), or a stop-request file, ``<run folder>/STOP``, which a front end without a console
shared with the run (Slicer on Windows, another machine on a shared folder) creates. A run
removes a stop file left over when it starts and when it ends, so an old request never stops
the next run.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

STOP_FILE_NAME = "STOP"


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
    is read, at the run's safe points). With ``clear=True`` a stop file is removed on entering
    (a request left from an earlier run) and on leaving. A second SIGINT raises
    KeyboardInterrupt at once. Outside the main thread (where Python cannot install
    handlers) only ``request()`` and the stop file work.
    """

    def __init__(self, stop_path: str | Path | None = None, clear: bool = True) -> None:
        self.stop_path = Path(stop_path) if stop_path is not None else None
        self.clear = clear
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

    def _remove_stop_file(self) -> None:
        if self.clear and self.stop_path is not None:
            with contextlib.suppress(OSError):
                self.stop_path.unlink(missing_ok=True)

    def __enter__(self) -> StopRequest:
        self._remove_stop_file()
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        self._remove_stop_file()
