"""Follow a training run through its ``events.jsonl`` (no Qt).

A run (``mtkd train|distill CONFIG --run-dir RUN``) appends one JSON object per line to
``RUN/events.jsonl``, flushed and synced per event; a reader may see a torn last line. The
Slicer module polls from a timer on the main thread:

- :class:`EventFollower`: the complete events added since the last call (a byte offset; a
  file that is replaced or truncated, e.g. a new run in the same folder, is read afresh).
- :class:`RunMonitor`: folds the events into a :class:`RunState` (state, epochs, history,
  best Dice, ETA, error, ...); :func:`format_status` makes the one-line status from it.
- the run's MRML plots are kept by :mod:`MTKDLib.run_plots`, and whether its process still
  runs is answered by :func:`MTKDLib.process.pid_alive`.

Neither torch nor Qt is imported, so the GUI can follow a run before the engine's
dependencies are installed, and the tests use a headless ``slicer-core`` scene.
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mtkd.progress import PREFIX as PROGRESS_PREFIX
from mtkd.run_folder import RunDir
from MTKDLib.process import pid_alive

LOG_LINES = 20
# metrics fields that are not loss terms (the rest that is numeric and not val_* is)
NOT_TERMS = frozenset({"epoch", "epochs", "lr", "seconds", "samples", "time"})
EXPORTING_PROGRESS = 0.99

STATES = ("waiting", "preparing", "training", "interrupted", "exporting", "finished", "failed")


def is_number(value: Any) -> bool:
    """Whether ``value`` is an int or a float (not a bool) as JSON gives them."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def as_number(value: Any) -> float:
    """``value`` as a float; NaN when it is not a number (missing, None, text)."""
    return float(value) if is_number(value) else math.nan


class EventFollower:
    """Reads ``events.jsonl`` incrementally: each :meth:`read_new` returns the complete events
    (whole lines) written since the previous call.

    The file need not exist yet. A torn last line is left for a later call. When the file is
    replaced or truncated (its identity changes, it shrinks, or its first line is no longer
    the one read before, as when a new run starts in the same folder), reading starts over
    from its beginning and :attr:`resets` goes up by one, so the caller can drop what it
    built from the old file. A complete line that is not a JSON object is skipped.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.resets = 0
        self._offset = 0
        self._head = b""  # the first complete line read, to recognise a replaced file
        self._identity: tuple[int, int] | None = None

    @property
    def offset(self) -> int:
        """Bytes of the file consumed so far (complete lines only)."""
        return self._offset

    def _start_over(self) -> None:
        self._offset = 0
        self._head = b""
        self._identity = None
        self.resets += 1

    def _unread_bytes(self, handle: Any) -> bytes:
        """The bytes after the offset (after starting over when the file was replaced)."""
        status = os.fstat(handle.fileno())
        identity = (status.st_dev, status.st_ino)
        if self._identity is not None and (
            identity != self._identity
            or status.st_size < self._offset
            or (self._head and handle.read(len(self._head)) != self._head)
        ):
            self._start_over()
        self._identity = identity
        if status.st_size <= self._offset:
            return b""
        handle.seek(self._offset)
        return handle.read(status.st_size - self._offset)

    def read_new(self) -> list[dict]:
        try:
            with open(self.path, "rb") as handle:
                data = self._unread_bytes(handle)
        except FileNotFoundError:
            if self._offset or self._identity is not None:
                self._start_over()  # removed: a new run is being set up here
            return []
        end = data.rfind(b"\n")
        if end < 0:
            return []  # only a torn line so far
        chunk = data[: end + 1]
        if self._offset == 0:
            self._head = chunk[: chunk.index(b"\n") + 1]
        self._offset += end + 1
        events = []
        for line in chunk.split(b"\n"):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(event, dict):
                events.append(event)
        return events


@dataclass
class RunState:
    """What a front end shows of a run, folded from its events.

    ``state`` is one of :data:`STATES`; ``phase`` is the last ``status`` event's own state
    (e.g. ``"initial_validation"`` while ``state`` is ``"preparing"``). ``epoch`` is the
    number of epochs done, ``history`` the ``metrics`` records (oldest first, one per epoch),
    ``loss_terms`` / ``val_metrics`` their numeric loss and validation fields in order of first
    appearance. ``eta_seconds`` is the mean wall time of this session's epochs times the
    epochs left (None before this session's first epoch and when not training).
    ``pid``, ``host``, ``argv`` and ``started_at`` (its time) come from the last "preparing"
    event: the process of the latest start or resume. ``generation`` counts how often the
    events file was replaced (a new run in the folder).
    """

    state: str = "waiting"
    phase: str = ""
    kind: str | None = None
    resumed: bool = False
    epoch: int = 0
    epochs: int | None = None
    start_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    loss_terms: list[str] = field(default_factory=list)
    val_metrics: list[str] = field(default_factory=list)
    best_val_dice: float | None = None
    best_epoch: int | None = None
    initial_val_dice: float | None = None
    error: str | None = None
    model: str | None = None
    stopped_by: str | None = None
    pid: int | None = None
    host: str | None = None
    argv: list[str] | None = None
    started_at: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    progress: float = 0.0
    eta_seconds: float | None = None
    events: int = 0
    generation: int = 0

    @property
    def latest(self) -> dict | None:
        """The last metrics record, or None before the first epoch."""
        return self.history[-1] if self.history else None

    @property
    def ended(self) -> bool:
        """The run's process is done with it (finished, failed or interrupted)."""
        return self.state in ("finished", "failed", "interrupted")


class RunMonitor:
    """Follows one run folder: call :meth:`update` from a timer; it reads only what was added.

    The folder may not hold a run yet ("waiting"), may be a run that ended long ago (its
    whole history is read on the first call: re-attaching after a restart), or may be
    reused by a new run (everything built from the old events is dropped).
    """

    def __init__(self, run_dir: str | Path, log_lines: int = LOG_LINES):
        self.run_dir = Path(run_dir)
        self.follower = EventFollower(RunDir(self.run_dir).events)
        self._log_lines = log_lines
        self._reset()

    def _reset(self) -> None:
        self._state = RunState(generation=self.follower.resets)
        self._log: deque[str] = deque(maxlen=self._log_lines)
        self._session_time: float | None = None  # time of this session's "training" status
        self._session_epochs: list[dict] = []

    # ---------------------------------------------------------------- reading
    def update(self) -> RunState:
        """Fold the new events in; a snapshot of the run's state (its lists are copies; the
        metrics records in ``history`` are shared and never modified)."""
        events = self.follower.read_new()
        if self.follower.resets != self._state.generation:
            self._reset()
        for event in events:
            self._fold(event)
        if events:
            self._derive()
        return self.snapshot()

    def snapshot(self) -> RunState:
        """The state as of the last :meth:`update`, without reading the file."""
        state = self._state
        return replace(
            state,
            history=list(state.history),
            loss_terms=list(state.loss_terms),
            val_metrics=list(state.val_metrics),
            argv=list(state.argv) if state.argv is not None else None,
            details=dict(state.details),
            log=list(self._log),
        )

    def add_output_lines(self, lines: Iterable[str]) -> None:
        """Add lines the run's process printed (stdout); machine-readable progress lines and
        blank lines are left out. The last ``log_lines`` lines (with the events' ``log``
        messages) are kept in :attr:`RunState.log`."""
        for line in lines:
            line = line.rstrip("\r\n")
            if line.strip() and not line.startswith(PROGRESS_PREFIX):
                self._log.append(line)

    def _fold(self, event: dict) -> None:
        state = self._state
        state.events += 1
        kind = event.get("type")
        if kind == "status":
            self._fold_status(event)
        elif kind == "metrics":
            self._fold_metrics(event)
        elif kind == "log":
            message = event.get("message", event.get("line", event.get("text", "")))
            self.add_output_lines(str(message).splitlines())
        elif kind == "done":
            state.state = state.phase = "finished"
            state.model = event.get("model")
            if "best_val_dice" in event:
                value = event["best_val_dice"]
                state.best_val_dice = float(value) if is_number(value) else None
            if is_number(event.get("best_epoch")):
                state.best_epoch = int(event["best_epoch"]) or None
            if is_number(event.get("initial_val_dice")):
                state.initial_val_dice = float(event["initial_val_dice"])
        elif kind == "error":
            state.state = state.phase = "failed"
            state.error = str(event.get("message", "unknown error"))

    def _fold_status(self, event: dict) -> None:
        state = self._state
        phase = str(event.get("state", ""))
        state.phase = phase
        if phase == "preparing":
            # a first start, or a resume appended to the same file: the history stays
            state.state = "preparing"
            state.error = state.model = state.stopped_by = None
            state.kind = event.get("kind", state.kind)
            state.resumed = bool(event.get("resume", False))
            # this process's own: one recorded by an earlier session is no longer valid
            state.pid = int(event["pid"]) if is_number(event.get("pid")) else None
            state.host = str(event["host"]) if event.get("host") else None
            argv = event.get("argv")
            state.argv = [str(arg) for arg in argv] if isinstance(argv, list) else None
            state.started_at = float(event["time"]) if is_number(event.get("time")) else None
            if not state.resumed:  # a resumed run does not validate its starting weights again
                state.initial_val_dice = None
            self._session_time, self._session_epochs = None, []
        elif phase == "initial_validation":
            state.state = "preparing"
            if is_number(event.get("val_dice")):
                state.initial_val_dice = float(event["val_dice"])
        elif phase == "training":
            state.state = "training"
            if is_number(event.get("epochs")):
                state.epochs = int(event["epochs"])
            if is_number(event.get("start_epoch")):
                state.start_epoch = int(event["start_epoch"])
                state.epoch = state.start_epoch
            ignore = {"type", "time", "state", "epochs", "start_epoch"}
            state.details = {k: v for k, v in event.items() if k not in ignore}
            self._session_time = event.get("time") if is_number(event.get("time")) else None
            self._session_epochs = []
        elif phase == "interrupted":
            state.state = "interrupted"
            if is_number(event.get("epoch")):
                state.epoch = int(event["epoch"])
            state.stopped_by = event.get("signal")
        elif phase == "exporting":
            state.state = "exporting"

    def _fold_metrics(self, event: dict) -> None:
        state = self._state
        record = {key: value for key, value in event.items() if key != "type"}
        epoch = int(record["epoch"]) if is_number(record.get("epoch")) else len(state.history) + 1
        record["epoch"] = epoch
        # a resume from an older checkpoint repeats epochs: the newer record replaces them
        while state.history and state.history[-1]["epoch"] >= epoch:
            state.history.pop()
        while self._session_epochs and self._session_epochs[-1]["epoch"] >= epoch:
            self._session_epochs.pop()
        state.history.append(record)
        self._session_epochs.append(record)
        state.epoch = epoch
        if is_number(record.get("epochs")):
            state.epochs = int(record["epochs"])
        if state.state in ("waiting", "preparing"):
            state.state = state.phase = "training"
        for key, value in record.items():
            if not is_number(value) or key in NOT_TERMS:
                continue
            names = state.val_metrics if key.startswith("val_") else state.loss_terms
            if key not in names:
                names.append(key)

    def _derive(self) -> None:
        """Best Dice, progress and ETA from the folded events."""
        state = self._state
        if state.state != "finished":
            validated = [r for r in state.history if math.isfinite(as_number(r.get("val_dice")))]
            if validated:
                best = max(validated, key=lambda r: r["val_dice"])  # first of equal ones
                state.best_val_dice, state.best_epoch = float(best["val_dice"]), best["epoch"]
            else:
                state.best_val_dice = state.best_epoch = None
        if state.state == "finished":
            state.progress = 1.0
        elif state.state == "exporting":
            state.progress = EXPORTING_PROGRESS
        elif state.epochs:
            state.progress = min(state.epoch / state.epochs, EXPORTING_PROGRESS)  # 1: finished
        else:
            state.progress = 0.0
        state.eta_seconds = None
        if state.state == "training" and state.epochs and self._session_epochs:
            left = max(state.epochs - state.epoch, 0)
            state.eta_seconds = self._epoch_seconds() * left

    def _epoch_seconds(self) -> float:
        """Mean wall time of this session's epochs (training, validation and checkpoint, from
        the events' times); the records' own ``seconds`` (training only) when times lack."""
        epochs = self._session_epochs
        last = epochs[-1].get("time")
        if self._session_time is not None and is_number(last) and last >= self._session_time:
            return (last - self._session_time) / len(epochs)
        seconds = [as_number(r.get("seconds")) for r in epochs]
        seconds = [s for s in seconds if math.isfinite(s)]
        return sum(seconds) / len(seconds) if seconds else 0.0

    # ---------------------------------------------------------------- process
    def process_alive(self) -> bool | None:
        """Whether the run's process still runs: True or False when the run recorded its pid
        and host and this is that host; None when it ran on another host (a run folder on a
        shared path) or recorded no pid. A pid reused by another program counts as dead (see
        :func:`pid_alive`)."""
        state = self._state
        if state.pid is None or not state.host or state.host != socket.gethostname():
            return None
        return pid_alive(state.pid, state.argv, state.started_at)

    @staticmethod
    def format_status(state: RunState) -> str:
        """See :func:`format_status`."""
        return format_status(state)


# ------------------------------------------------------------------- status line
def format_duration(seconds: float) -> str:
    """A duration for people: "40 s", "2 min", "1 h 05 min"."""
    seconds = max(float(seconds), 0.0)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _main_loss(state: RunState) -> tuple[str, float] | None:
    record = state.latest
    if record is None or not state.loss_terms:
        return None
    name = "loss" if "loss" in state.loss_terms else state.loss_terms[0]
    value = as_number(record.get(name))
    return (name, value) if math.isfinite(value) else None


def _last_val_dice(state: RunState) -> float | None:
    for record in reversed(state.history):
        value = as_number(record.get("val_dice"))
        if math.isfinite(value):
            return value
    return None


def format_status(state: RunState) -> str:
    """One line for the status label, e.g. ``"epoch 3/20, ETA 2 min, loss 0.41, val Dice
    0.81"``, ``"finished: best val Dice 0.85 at epoch 12"``, ``"failed: <message>"``,
    ``"stopped at epoch 7 (checkpoint kept; Resume continues)"``."""
    name = state.state
    if name == "waiting":
        return "waiting for the run to start"
    if name == "preparing":
        verb = "resuming" if state.resumed else "preparing"
        if state.initial_val_dice is not None:
            return f"{verb}: initial val Dice {state.initial_val_dice:.2f}"
        if state.phase == "initial_validation":
            return f"{verb}: validating the starting network"
        return f"{verb}: reading the data, building the networks"
    if name == "training":
        total = state.epochs if state.epochs is not None else "?"
        if not state.history:
            return f"training: first of {total} epochs running"
        parts = [f"epoch {state.epoch}/{total}"]
        if state.eta_seconds is not None:
            parts.append(f"ETA {format_duration(state.eta_seconds)}")
        loss = _main_loss(state)
        if loss is not None:
            parts.append(f"{loss[0]} {loss[1]:.2f}")
        dice = _last_val_dice(state)
        if dice is not None:
            parts.append(f"val Dice {dice:.2f}")
        return ", ".join(parts)
    if name == "exporting":
        if state.best_val_dice is not None:
            return (
                f"exporting the model (best val Dice {state.best_val_dice:.2f}"
                f" at epoch {state.best_epoch})"
            )
        return "exporting the model"
    if name == "finished":
        if state.best_val_dice is not None:
            return f"finished: best val Dice {state.best_val_dice:.2f} at epoch {state.best_epoch}"
        return f"finished: {state.epoch} epochs (not validated)"
    if name == "failed":
        return f"failed: {state.error}"
    if name == "interrupted":
        return f"stopped at epoch {state.epoch} (checkpoint kept; Resume continues)"
    return name


__all__ = [
    "STATES",
    "EventFollower",
    "RunMonitor",
    "RunState",
    "format_duration",
    "as_number",
    "format_status",
    "is_number",
]
