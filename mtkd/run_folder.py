"""The run folder: the contract between the engine and every front end.

::

    RUN/config.yaml        the full resolved configuration; paths relative to RUN, with their
                           absolute form as a fallback (:mod:`mtkd.config_paths`)
    RUN/split.json         the patient-level split used
    RUN/fingerprint.json   what the run trains on: its cases' files and its teacher (SHA-256;
                           :mod:`mtkd.engine.fingerprint`), checked when it is resumed
    RUN/.mtkd.lock         while a process writes the run: who (:mod:`mtkd.folder_lock`)
    RUN/events.jsonl       one JSON object per line ("metrics", "status", "log", "done", "error")
    RUN/checkpoints/       last.pt and best.pt, written atomically
    RUN/model/             the exported network (weights + metadata)
    RUN/report/            tables written at the end

:class:`RunDir` is the one owner of this layout (no other module joins these names), and
:meth:`RunDir.state` with :meth:`RunDir.check_holds` is the one rule for what to do with a run
folder that a protocol, an ablation or MTKD Train meets again: continue a new one, resume a
stopped one, skip a finished one, and refuse one that holds a run of another configuration.
Free of torch: the Slicer modules and the model library read run folders with it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from mtkd.config import RunConfig, differing_keys, dump_config, load_config
from mtkd.data.atomic import TEMPORARY_PREFIX, atomic_write_bytes
from mtkd.errors import MTKDError
from mtkd.modelfiles.files import METADATA, RUN_MODEL

NEW, STOPPED, FINISHED = "new", "stopped", "finished"
""":attr:`RunDir.state`: nothing to resume; a checkpoint to resume from; an exported model."""


class RunDir:
    """Paths and files of one run folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    config = property(lambda self: self.root / "config.yaml")
    split = property(lambda self: self.root / "split.json")
    fingerprint = property(lambda self: self.root / "fingerprint.json")
    events = property(lambda self: self.root / "events.jsonl")
    checkpoints = property(lambda self: self.root / "checkpoints")
    last_checkpoint = property(lambda self: self.root / "checkpoints" / "last.pt")
    best_checkpoint = property(lambda self: self.root / "checkpoints" / "best.pt")
    model = property(lambda self: self.root / RUN_MODEL)
    model_metadata = property(lambda self: self.root / RUN_MODEL / METADATA)
    report = property(lambda self: self.root / "report")

    @property
    def state(self) -> str:
        """:data:`FINISHED` (its model exported), :data:`STOPPED` (a checkpoint to resume
        from) or :data:`NEW`."""
        if self.model_metadata.is_file():
            return FINISHED
        if self.last_checkpoint.is_file():
            return STOPPED
        return NEW

    @property
    def is_run(self) -> bool:
        """Whether this folder holds a run's configuration and split (a run was started)."""
        return self.config.is_file() and self.split.is_file()

    def check_holds(self, config: RunConfig, advice: str) -> None:
        """MTKDError unless the run stored here (if any) is a run of ``config``: every key but
        ``train.device`` (where a run ran does not change what it is), paths compared where
        they point. ``advice`` ends the message (what the user can do instead)."""
        if self.state == NEW:
            return
        stored, expected = self.load_config().to_dict(), config.with_absolute_paths().to_dict()
        stored["train"]["device"] = expected["train"]["device"] = None
        differences = differing_keys(stored, expected)
        if differences:
            raise MTKDError(
                "this run folder holds a run of another configuration (it differs in "
                f"{', '.join(differences)}); {advice}",
                path=self.root,
            )

    def create(self, config: RunConfig) -> None:
        """Start a new run here.

        A folder whose run saved a checkpoint is never overwritten (resume it instead); one
        whose run failed before its first checkpoint is started afresh. Call it while holding
        the folder's lock (:class:`mtkd.folder_lock.FolderLock`).
        """
        if self.last_checkpoint.exists() or self.model.exists():
            raise MTKDError(
                "this folder already holds a run; resume it with --resume or choose another",
                path=self.root,
            )
        for stale in (self.events, self.split, self.fingerprint):
            stale.unlink(missing_ok=True)
        for folder in (self.root, self.checkpoints, self.report):
            folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.config, dump_config(config, folder=self.root).encode())

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary files that a killed process left in ``checkpoints/`` and
        ``model/`` (see :func:`mtkd.data.atomic.atomic_path`); call it only while holding the
        folder's lock, so that no other process writes this run. Returns what was removed."""
        stale = [
            path
            for folder in (self.checkpoints, self.model)
            if folder.is_dir()
            for path in folder.glob(f"{TEMPORARY_PREFIX}*")
        ]
        for path in stale:
            path.unlink(missing_ok=True)
        return stale

    def load_config(self) -> RunConfig:
        """The run's configuration, its paths found from any working directory (relative to
        this folder, else where they were when the run was made)."""
        if not self.config.is_file():
            raise MTKDError("not a run folder (config.yaml is missing)", path=self.root)
        return load_config(self.config)

    def write_json(self, path: Path, data: Any) -> None:
        atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


class EventLog:
    """Appends one JSON object per line to ``events.jsonl``, flushed and synced per event.

    A reader (Slicer's timer, ``tail -f``) may see a partial last line while it is being
    written; :func:`read_events` skips it. A line left unfinished by a killed process is ended
    before the first new event, so that it never swallows that event.
    """

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self._checked_end = False

    def emit(self, event_type: str, **fields: Any) -> dict:
        event = {"type": event_type, "time": round(time.time(), 3), **fields}
        if self.enabled:
            line = json.dumps(event, default=_jsonable) + "\n"
            if not self._checked_end:
                line = self._end_torn_line() + line
                self._checked_end = True
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
        return event

    def _end_torn_line(self) -> str:
        """A newline if the file ends inside a line (its writer was killed), else nothing."""
        try:
            with open(self.path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                if handle.tell() == 0:
                    return ""
                handle.seek(-1, os.SEEK_END)
                return "" if handle.read(1) == b"\n" else "\n"
        except FileNotFoundError:
            return ""


def read_events(path: str | Path) -> list[dict]:
    """All complete events of an ``events.jsonl`` (a torn last line is ignored)."""
    events = []
    path = Path(path)
    if not path.exists():
        return events
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
