"""Follow a training run through its ``events.jsonl`` and show it as MRML plots (no Qt).

A run (``mtkd train|distill CONFIG --run-dir RUN``) appends one JSON object per line to
``RUN/events.jsonl``, flushed and synced per event; a reader may see a torn last line. The
Slicer module polls from a timer on the main thread:

- :class:`EventFollower`: the complete events added since the last call (a byte offset; a
  file that is replaced or truncated, e.g. a new run in the same folder, is read afresh).
- :class:`RunMonitor`: folds the events into a :class:`RunState` (state, epochs, history,
  best Dice, ETA, error, ...); :func:`format_status` makes the one-line status from it.
- :class:`RunPlots`: a table node (one row per epoch) and two plot charts (losses, validation
  Dice) kept up to date from a :class:`RunState`, appending only the new rows; re-attaching
  to a run takes its nodes over. :func:`plot_view_node`: the plot view node a plot widget
  shows them in, one per widget.

Neither torch nor Qt is imported, so the GUI can follow a run before the engine's
dependencies are installed, and the tests use a headless ``slicer-core`` scene.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import sys
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mtkd.processes import pid_exists
from mtkd.progress import PREFIX as PROGRESS_PREFIX
from mtkd.run_folder import RunDir

LOG_LINES = 20
# metrics fields that are not loss terms (the rest that is numeric and not val_* is)
NOT_TERMS = frozenset({"epoch", "epochs", "lr", "seconds", "samples", "time"})
EXPORTING_PROGRESS = 0.99

STATES = ("waiting", "preparing", "training", "interrupted", "exporting", "finished", "failed")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(value: Any) -> float:
    """``value`` as a float; NaN when it is not a number (missing, None, text)."""
    return float(value) if _is_number(value) else math.nan


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
                state.best_val_dice = float(value) if _is_number(value) else None
            if _is_number(event.get("best_epoch")):
                state.best_epoch = int(event["best_epoch"]) or None
            if _is_number(event.get("initial_val_dice")):
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
            state.pid = int(event["pid"]) if _is_number(event.get("pid")) else None
            state.host = str(event["host"]) if event.get("host") else None
            argv = event.get("argv")
            state.argv = [str(arg) for arg in argv] if isinstance(argv, list) else None
            state.started_at = float(event["time"]) if _is_number(event.get("time")) else None
            if not state.resumed:  # a resumed run does not validate its starting weights again
                state.initial_val_dice = None
            self._session_time, self._session_epochs = None, []
        elif phase == "initial_validation":
            state.state = "preparing"
            if _is_number(event.get("val_dice")):
                state.initial_val_dice = float(event["val_dice"])
        elif phase == "training":
            state.state = "training"
            if _is_number(event.get("epochs")):
                state.epochs = int(event["epochs"])
            if _is_number(event.get("start_epoch")):
                state.start_epoch = int(event["start_epoch"])
                state.epoch = state.start_epoch
            ignore = {"type", "time", "state", "epochs", "start_epoch"}
            state.details = {k: v for k, v in event.items() if k not in ignore}
            self._session_time = event.get("time") if _is_number(event.get("time")) else None
            self._session_epochs = []
        elif phase == "interrupted":
            state.state = "interrupted"
            if _is_number(event.get("epoch")):
                state.epoch = int(event["epoch"])
            state.stopped_by = event.get("signal")
        elif phase == "exporting":
            state.state = "exporting"

    def _fold_metrics(self, event: dict) -> None:
        state = self._state
        record = {key: value for key, value in event.items() if key != "type"}
        epoch = int(record["epoch"]) if _is_number(record.get("epoch")) else len(state.history) + 1
        record["epoch"] = epoch
        # a resume from an older checkpoint repeats epochs: the newer record replaces them
        while state.history and state.history[-1]["epoch"] >= epoch:
            state.history.pop()
        while self._session_epochs and self._session_epochs[-1]["epoch"] >= epoch:
            self._session_epochs.pop()
        state.history.append(record)
        self._session_epochs.append(record)
        state.epoch = epoch
        if _is_number(record.get("epochs")):
            state.epochs = int(record["epochs"])
        if state.state in ("waiting", "preparing"):
            state.state = state.phase = "training"
        for key, value in record.items():
            if not _is_number(value) or key in NOT_TERMS:
                continue
            names = state.val_metrics if key.startswith("val_") else state.loss_terms
            if key not in names:
                names.append(key)

    def _derive(self) -> None:
        """Best Dice, progress and ETA from the folded events."""
        state = self._state
        if state.state != "finished":
            validated = [r for r in state.history if math.isfinite(_number(r.get("val_dice")))]
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
        if self._session_time is not None and _is_number(last) and last >= self._session_time:
            return (last - self._session_time) / len(epochs)
        seconds = [_number(r.get("seconds")) for r in epochs]
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


def pid_alive(pid: int, argv: Sequence[str] | None = None, started_at: float | None = None) -> bool:
    """Whether process ``pid`` of this machine runs and, on Linux, is still the run's process
    rather than a later one that reused its pid: its command line mentions ``mtkd`` or ends
    with ``argv[1:]`` (the arguments the run recorded), or it started no later than
    ``started_at`` (the time of the run's first event: a process that already had this pid
    then is the run's own)."""
    if not pid_exists(pid):
        return False
    if not sys.platform.startswith("linux") or not Path("/proc/self/cmdline").exists():
        return True
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # unreadable: trust the signal
    words = [word.decode(errors="replace") for word in raw.split(b"\0") if word]
    if not words:
        return False  # a zombie: ended, not yet reaped
    if any(_names_mtkd(word) for word in words):
        return True
    tail = list(argv[1:]) if argv else []
    if tail and words[-len(tail) :] == tail:
        return True
    began = _linux_start_time(pid)
    return began is not None and started_at is not None and began <= started_at + START_SLACK


START_SLACK = 1.0  # seconds: /proc/stat's boot time is whole seconds


def _linux_start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22, starttime
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _names_mtkd(word: str) -> bool:
    """``mtkd`` (``-m mtkd``), ``mtkd.cli``, ``/venv/bin/mtkd``, ``/src/mtkd/__main__.py``; not a
    folder that merely contains the letters (``/opt/mtkd-env/bin/python``)."""
    for part in re.split(r"[\\/]", word.lower()):
        if part in ("mtkd", "mtkd.exe") or part.startswith("mtkd."):
            return True
    return False


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
    value = _number(record.get(name))
    return (name, value) if math.isfinite(value) else None


def _last_val_dice(state: RunState) -> float | None:
    for record in reversed(state.history):
        value = _number(record.get("val_dice"))
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


# ------------------------------------------------------------------------- MRML
# Colours of the plot series, in order (Slicer's plots cycle nothing by themselves).
PALETTE = (
    (0.12, 0.47, 0.71),
    (1.00, 0.50, 0.05),
    (0.17, 0.63, 0.17),
    (0.84, 0.15, 0.16),
    (0.58, 0.40, 0.74),
    (0.55, 0.34, 0.29),
    (0.89, 0.47, 0.76),
    (0.50, 0.50, 0.50),
    (0.74, 0.74, 0.13),
    (0.09, 0.75, 0.81),
)
EPOCH_COLUMN = "epoch"
VAL_SERIES = ("val_dice",)


RUN_ATTRIBUTE = "MTKD.run"  # the run a plot node shows (its run folder)
ROLE_ATTRIBUTE = "MTKD.plot"  # "table", "losses", "validation" or "series"
COLUMN_ATTRIBUTE = "MTKD.column"  # the table column a series node draws
PLOT_VIEW_OWNER = "MTKD.PlotViews"  # singleton tag of the node that owns the plot views


def _nodes_by_class(scene: Any, class_name: str) -> list[Any]:
    return [
        scene.GetNthNodeByClass(i, class_name)
        for i in range(scene.GetNumberOfNodesByClass(class_name))
    ]


def _run_node(scene: Any, class_name: str, key: str, role: str, column: str | None = None):
    """The node of ``class_name`` a :class:`RunPlots` for run ``key`` added before, or None."""
    for node in _nodes_by_class(scene, class_name):
        if (
            node.GetAttribute(RUN_ATTRIBUTE) == key
            and node.GetAttribute(ROLE_ATTRIBUTE) == role
            and (column is None or node.GetAttribute(COLUMN_ATTRIBUTE) == column)
        ):
            return node
    return None


def _singleton(scene: Any, class_name: str, tag: str, name: str) -> Any:
    """The node of ``class_name`` with singleton tag ``tag``; added when the scene has none."""
    node = scene.GetSingletonNode(tag, class_name)
    if node is None:
        node = scene.CreateNodeByClass(class_name)
        node.UnRegister(None)  # CreateNodeByClass added a reference the variable owns already
        node.SetSingletonTag(tag)
        node.SetName(name)
        node = scene.AddNode(node)
    return node


def plot_view_node(scene: Any, tag: str, chart: Any | None = None) -> Any:
    """The ``vtkMRMLPlotViewNode`` of the plot widget known by ``tag`` (unique per widget):
    created the first time, the same node afterwards (a singleton, so a saved and reloaded
    scene or a closed one keeps one per widget). A ``qMRMLPlotWidget`` makes none itself; give
    this one to its ``setMRMLPlotViewNode``. Its parent layout node is a hidden owner node, as
    for views shown outside the view layout (Slicer's script repository, "Show a 3D view
    outside the view layout"), so the layout manager leaves it alone. Shows ``chart`` (a
    ``vtkMRMLPlotChartNode``) when given.
    """
    owner = _singleton(scene, "vtkMRMLScriptedModuleNode", PLOT_VIEW_OWNER, "MTKD plot views")
    owner.SetHideFromEditors(True)
    view = _singleton(scene, "vtkMRMLPlotViewNode", tag, f"{tag} view")
    if view.GetLayoutName() != tag:
        view.SetLayoutName(tag)
    if view.GetParentLayoutNode() is not owner:
        view.SetAndObserveParentLayoutNodeID(owner.GetID())
    if chart is not None and view.GetPlotChartNodeID() != chart.GetID():
        view.SetPlotChartNodeID(chart.GetID())
    return view


class RunPlots:
    """A run's history as MRML: a table node (one row per epoch; columns ``epoch``, each loss
    term, each validation metric, NaN where an epoch has no value) and two plot charts,
    ``"<name> losses"`` (a series per loss term) and ``"<name> validation Dice"``.

    ``key`` (default ``name``; the run folder where names can repeat) identifies the run: the
    nodes a :class:`RunPlots` of the same key left in the scene are taken over (re-attaching
    to a run adds no nodes); the others are created here. :meth:`update` appends the new epochs
    only (and adds the columns and series of terms that appear later), and returns at once
    when nothing changed. A history that was rewritten (a new run in the folder, a resume that
    repeated epochs) is rebuilt in the same nodes; series of terms the run no longer has are
    removed. :meth:`remove` takes the nodes out of the scene.
    """

    def __init__(self, scene: Any, name: str, key: str | None = None):
        self.scene = scene
        self.name = name
        self.key = key or name
        self.table = self._node("vtkMRMLTableNode", "table", f"{name} history")
        self.loss_chart = self._node("vtkMRMLPlotChartNode", "losses", f"{name} losses")
        self.val_chart = self._node("vtkMRMLPlotChartNode", "validation", f"{name} validation Dice")
        self.loss_chart.SetTitle(f"{name}: training losses")
        self.loss_chart.SetXAxisTitle("epoch")
        self.loss_chart.SetYAxisTitle("loss")
        self.val_chart.SetTitle(f"{name}: validation Dice")
        self.val_chart.SetXAxisTitle("epoch")
        self.val_chart.SetYAxisTitle("Dice")
        self.series: dict[str, Any] = {}  # column name -> its plot series node
        for chart in (self.loss_chart, self.val_chart):
            for index in range(chart.GetNumberOfPlotSeriesNodes()):
                series = chart.GetNthPlotSeriesNode(index)
                column = series.GetAttribute(COLUMN_ATTRIBUTE) if series else None
                if column and series.GetAttribute(RUN_ATTRIBUTE) == self.key:
                    self.series[column] = series
        self._written: list[dict] = []  # the records in the table, in order
        self._generation: int | None = None
        self._clear()

    def _node(self, class_name: str, role: str, name: str) -> Any:
        node = _run_node(self.scene, class_name, self.key, role)
        if node is None:
            node = self.scene.AddNewNodeByClass(class_name, name)
            node.SetAttribute(RUN_ATTRIBUTE, self.key)
            node.SetAttribute(ROLE_ATTRIBUTE, role)
        return node

    def nodes(self) -> tuple[Any, Any, Any]:
        """(table node, losses chart node, validation Dice chart node)."""
        return self.table, self.loss_chart, self.val_chart

    @property
    def columns(self) -> list[str]:
        table = self.table.GetTable()
        return [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())]

    def update(self, state: RunState) -> bool:
        """Bring the nodes up to ``state.history``; whether anything changed."""
        history = state.history
        written = self._written
        same_run = state.generation == self._generation
        if (
            same_run
            and len(history) == len(written)
            and (not written or history[-1] is written[-1])
        ):
            return False
        same_rows = (
            same_run
            and len(history) >= len(written)
            and all(a is b or a == b for a, b in zip(history, written))
        )
        if same_rows:
            written[:] = history[: len(written)]  # equal records: compare by identity next time
        else:
            self._clear()
        self._generation = state.generation
        new = history[len(self._written) :]
        if not new:
            self._sync_series()
            return not same_rows
        import vtk

        table = self.table.GetTable()
        was_modifying = self.table.StartModify()
        rows = table.GetNumberOfRows()
        names = [*state.loss_terms, *state.val_metrics]
        names += [k for r in new for k in r if _is_number(r[k]) and k not in NOT_TERMS]
        for name in dict.fromkeys(names):
            if table.GetColumnByName(name) is None:
                column = vtk.vtkDoubleArray()
                column.SetName(name)
                for _ in range(rows):
                    column.InsertNextValue(math.nan)
                table.AddColumn(column)
        columns = [table.GetColumn(i) for i in range(table.GetNumberOfColumns())]
        for record in new:
            for column in columns:
                column.InsertNextValue(_number(record.get(column.GetName())))
        for column in columns:
            column.Modified()
        table.Modified()
        self._written.extend(new)
        self.table.Modified()
        self.table.EndModify(was_modifying)
        self._sync_series()
        return True

    def _sync_series(self) -> None:
        """One series per plotted column of the table: those of columns the table no longer
        has are removed, the missing ones added."""
        columns = self.columns[1:]
        for name in [name for name in self.series if name not in columns]:
            self._remove_series(self.series.pop(name))
        for name in columns:
            if name in self.series:
                continue
            if name.startswith("val_"):
                if name in VAL_SERIES:
                    self._add_series(name, self.val_chart)
            else:
                self._add_series(name, self.loss_chart)

    def _add_series(self, column: str, chart: Any) -> None:
        series = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{self.name} {column}")
        series.SetAttribute(RUN_ATTRIBUTE, self.key)
        series.SetAttribute(ROLE_ATTRIBUTE, "series")
        series.SetAttribute(COLUMN_ATTRIBUTE, column)
        series.SetAndObserveTableNodeID(self.table.GetID())
        series.SetXColumnName(EPOCH_COLUMN)
        series.SetYColumnName(column)
        series.SetPlotType(series.PlotTypeScatter)
        series.SetMarkerStyle(series.MarkerStyleCircle)
        series.SetLineStyle(series.LineStyleSolid)
        series.SetColor(*PALETTE[chart.GetNumberOfPlotSeriesNodes() % len(PALETTE)])
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
        self.series[column] = series

    def _remove_series(self, series: Any) -> None:
        for chart in (self.loss_chart, self.val_chart):
            chart.RemovePlotSeriesNodeID(series.GetID())
        if series.GetScene() is not None:
            self.scene.RemoveNode(series)

    def _clear(self) -> None:
        """An empty table with only the epoch column (the series stay until
        :meth:`_sync_series` knows the new columns)."""
        import vtk

        table = self.table.GetTable()
        was_modifying = self.table.StartModify()
        while table.GetNumberOfColumns():
            table.RemoveColumn(table.GetNumberOfColumns() - 1)
        epoch = vtk.vtkDoubleArray()
        epoch.SetName(EPOCH_COLUMN)
        table.AddColumn(epoch)
        table.Modified()
        self.table.Modified()
        self.table.EndModify(was_modifying)
        self._written = []

    def remove(self) -> None:
        """Take the table, charts and series out of the scene."""
        for node in [*self.series.values(), *self.nodes()]:
            if node.GetScene() is not None:
                self.scene.RemoveNode(node)
        self.series = {}


__all__ = [
    "STATES",
    "EventFollower",
    "RunMonitor",
    "RunPlots",
    "RunState",
    "format_duration",
    "format_status",
    "pid_alive",
    "plot_view_node",
]
