"""Distillation runs started, stopped, resumed and followed from Slicer (no Qt).

A run is ``mtkd distill`` in its own process (never in Slicer's GUI thread) writing a run
folder; :class:`TrainingRun` follows the folder's ``events.jsonl`` (and the process's output
when this session started it) into a :class:`~MTKDLib.run_monitor.RunState` and, when given a
scene, into table and plot nodes. Stop asks the process to stop (it saves a checkpoint first);
Resume continues from that checkpoint; a run folder can be attached to at any time, e.g. after
Slicer restarted or on a shared path where a GPU server writes it.

One process writes a run folder at a time (:mod:`mtkd.folder_lock`): Start and Resume are
refused, naming the holder, while another run (a command line, another Slicer) writes it. A
process that Stop or Kill ended leaves no lock that blocks the next start: a lock whose holder
died on this machine is recovered.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from mtkd.engine.signals import request_stop, stop_file
from mtkd.folder_lock import FolderLock, check_unlocked
from mtkd.run_folder import STOPPED, RunDir
from MTKDLib.process import (
    BackgroundProcess,
    EngineLogic,
    engine_command,
    engine_environment,
    error_message,
)
from MTKDLib.run_monitor import RunMonitor, RunState
from MTKDLib.run_plots import RunPlots
from MTKDLib.train_config import TrainingOptions, distill_arguments, write_config


class TrainingRun:
    """One run folder, followed; ``process`` is set when this session runs it."""

    def __init__(
        self,
        run_dir: Path,
        process: BackgroundProcess | None,
        plots: Any = None,
        launched_at: float | None = None,
    ):
        self.run_dir = Path(run_dir).absolute()
        self.process = process
        # when ``process`` was started (default: now): events older than this are an earlier
        # process's
        self.launched_at = time.time() if launched_at is None else launched_at
        self.plots = plots
        self.monitor = RunMonitor(self.run_dir)
        self.state = RunState()

    def poll(self) -> RunState:
        """Read what is new (events, process output); update the plots. Never blocks."""
        process = self.process
        if process is not None:
            self.monitor.add_output_lines(process.read_lines())
        state = self.monitor.update()
        if process is not None and process.running and state.ended:
            # a resumed run's process has not written its first event yet: the end read is
            # the previous session's
            state.state, state.phase = "preparing", "resuming"
        if process is not None and process.returncode not in (None, 0):
            own = state.started_at is not None and state.started_at >= self.launched_at
            if not state.ended or not own:
                # ended without saying so (killed, crashed or refused before its first event,
                # e.g. by the folder's lock; the end read is then an earlier process's): say why
                state.state = "failed"
                state.error = error_message(process.tail(50), process.returncode)
        if self.plots is not None:
            self.plots.update(state)
        self.state = state
        return state

    @property
    def running(self) -> bool | None:
        """Whether the training process runs (None: unknown, a run on another machine)."""
        if self.process is not None:
            return self.process.running
        return self.monitor.process_alive()

    def stop(self) -> None:
        """Ask the run to stop at its next safe point; it saves a checkpoint first. Returns
        at once. An attached run is asked through its stop file (``RUN/STOP``, which also
        reaches a run on another machine writing to a shared folder), plus SIGTERM on POSIX
        when it runs on this machine."""
        if self.process is not None:
            self.process.request_stop()
            return
        state = self.poll()
        alive = self.monitor.process_alive()
        if state.ended or alive is False:
            raise RuntimeError(
                f"this run's process is not running (checked on {socket.gethostname()})"
            )
        request_stop(self.run_dir)
        if alive and state.pid and sys.platform != "win32":  # attached, same machine
            with contextlib.suppress(OSError):
                os.kill(state.pid, signal.SIGTERM)

    def kill(self) -> None:
        """End the process tree now (the last checkpoint on disk stays)."""
        if self.process is not None:
            self.process.kill()


class TrainLogic(EngineLogic):
    """Starts, resumes and attaches to distillation runs for ``scene``'s plots."""

    def _plots(self, run_dir: Path) -> Any:
        """The run's plot nodes; those already in the scene for this folder are reused."""
        if self.scene is None:
            return None
        return RunPlots(self.scene, run_dir.name, key=str(run_dir.resolve()))

    def _spawn(self, run_dir: Path, resume: bool) -> TrainingRun:
        # absolute: the child's working directory does not matter (the run's config.yaml
        # finds its paths from the run folder)
        run_dir = run_dir.absolute()
        command = engine_command(distill_arguments(run_dir, resume), self.python)
        launched_at = time.time()
        process = BackgroundProcess(
            command, env=self.env or engine_environment(), stop_file=stop_file(run_dir)
        )
        return TrainingRun(run_dir, process, self._plots(run_dir), launched_at)

    def start(self, options: TrainingOptions, run_dir: str | Path) -> TrainingRun:
        """Write ``RUN/config.yaml`` from ``options`` and start ``mtkd distill`` on it.
        FolderLocked (naming the holder) while another process writes the folder: its
        configuration is never overwritten under it."""
        run_dir = Path(run_dir)
        with FolderLock(run_dir, "MTKD Train (writing config.yaml)"):
            write_config(options, run_dir)
        return self._spawn(run_dir, resume=False)

    def resume(self, run_dir: str | Path) -> TrainingRun:
        """Continue a stopped or interrupted run from its last checkpoint. FolderLocked at
        once while another process writes the folder (the engine refuses it too, and its
        one-line error becomes the run's error: :func:`MTKDLib.process.error_message`)."""
        run_dir = Path(run_dir)
        if RunDir(run_dir).state != STOPPED:
            raise ValueError(f"{run_dir}: no checkpoint to resume from (checkpoints/last.pt)")
        check_unlocked(run_dir)
        return self._spawn(run_dir, resume=True)

    def attach(self, run_dir: str | Path) -> TrainingRun:
        """Follow a run folder this session did not start (running, stopped or finished)."""
        run_dir = Path(run_dir)
        if not RunDir(run_dir).config.is_file() and not RunDir(run_dir).events.is_file():
            raise ValueError(f"{run_dir}: not a run folder (no config.yaml or events.jsonl)")
        return TrainingRun(run_dir, None, self._plots(run_dir))
