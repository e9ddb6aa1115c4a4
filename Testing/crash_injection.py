"""Run ``mtkd`` with a crash injected at a chosen moment: the process sends itself SIGKILL in
the middle of a write, as a power cut or the out-of-memory killer would.

    python Testing/crash_injection.py checkpoint ARGS...   half of the first checkpoint written
    python Testing/crash_injection.py event ARGS...        half of the first metrics event written

The write goes to the real file (the temporary file of the atomic checkpoint write, or
``events.jsonl``) and is synced, so what the next process finds is what a crash leaves.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys

import torch

from mtkd.cli import main
from mtkd.run_folder import EventLog


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _write_half(path: str | os.PathLike, data: bytes, mode: str) -> None:
    with open(path, mode) as stream:
        stream.write(data[: len(data) // 2])
        stream.flush()
        os.fsync(stream.fileno())


def crash_in_checkpoint_write() -> None:
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if not str(f).endswith("last.pt"):
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        _write_half(f, buffer.getvalue(), "wb")
        _die()

    torch.save = save


def crash_in_event_write() -> None:
    real_emit = EventLog.emit

    def emit(self, event_type, **fields):
        if event_type != "metrics" or not self.enabled:
            return real_emit(self, event_type, **fields)
        line = json.dumps({"type": event_type, **fields}, default=str) + "\n"
        _write_half(self.path, line.encode(), "ab")
        _die()

    EventLog.emit = emit


if __name__ == "__main__":
    {"checkpoint": crash_in_checkpoint_write, "event": crash_in_event_write}[sys.argv[1]]()
    sys.exit(main(sys.argv[2:]))
