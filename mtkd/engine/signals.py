"""SIGINT/SIGTERM ask a run to stop at the next safe point (it saves a checkpoint first)."""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """Context manager: while active, SIGINT/SIGTERM set ``requested`` instead of killing.

    A second SIGINT raises KeyboardInterrupt at once. Outside the main thread (where Python
    cannot install handlers) it only offers ``request()``.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def request(self, name: str = "request") -> None:
        self.requested = True
        self.signal_name = name

    def _handle(self, signum: int, _frame: object) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.request(signal.Signals(signum).name)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
