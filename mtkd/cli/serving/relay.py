"""A text stream that hands each complete line written to it to a callback: what a job of
``mtkd serve`` prints becomes its ``line`` replies."""

from __future__ import annotations

import io
import threading
from collections import deque
from collections.abc import Callable


class LineRelay(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` of a job: ``emit(line)`` for every line (without its
    end); a last unfinished line is emitted by :meth:`finish`. The last lines are kept in
    ``recent``."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, emit: Callable[[str], None], keep: int = 20):
        super().__init__()
        self._emit = emit
        self._partial = ""
        self._lock = threading.Lock()
        self.recent: deque[str] = deque(maxlen=keep)

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        with self._lock:
            *lines, self._partial = (self._partial + text).split("\n")
            for line in lines:
                self._send(line)
        return len(text)

    def finish(self) -> None:
        """Emit what was written after the last line end."""
        with self._lock:
            if self._partial:
                self._send(self._partial)
                self._partial = ""

    def _send(self, line: str) -> None:
        line = line.rstrip("\r")
        self.recent.append(line)
        self._emit(line)
