"""Several runs of a grid at once (``mtkd ablate --jobs N``), each in its own child process.

Each run is an ordinary ``mtkd train|distill CONFIG --run-dir RUN`` (or ``--resume RUN``) in a
child process of its own session, so that a Ctrl-C at the terminal reaches only the grid, which
then asks every child to stop at its next safe point (SIGTERM: its checkpoint is saved) and
waits for them. A child's output goes to ``GRID/jobs/<run>.log``; the configuration it was
given, with absolute paths, to ``GRID/jobs/<run>.yaml``. On the CPU each child gets an equal
share of the cores as its thread count (``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mtkd.config import RunConfig, dump_config
from mtkd.data.atomic import atomic_write_bytes
from mtkd.errors import MTKDError

INTERRUPTED = 130  # the exit status of `mtkd train|distill` stopped at a safe point
_POLL_SECONDS = 0.2
_LOG_TAIL_LINES = 15


class JobsInterrupted(Exception):
    """The grid was asked to stop; every child has saved its checkpoint and exited."""


@dataclass
class Job:
    """One run of the grid: ``key`` its folder relative to the grid (``cells/<cell>/seed<k>``),
    ``resume`` whether its folder holds a checkpoint to continue from."""

    key: str
    config: RunConfig
    run_dir: Path
    resume: bool
    process: subprocess.Popen | None = None
    log: Path | None = None

    @property
    def state(self) -> str:
        return "resumed" if self.resume else "trained"


def threads_per_job(jobs: int, cpus: int | None = None) -> int:
    """Threads for each of ``jobs`` concurrent CPU runs: an equal share of ``cpus``, at least 1."""
    return max(1, (cpus or os.cpu_count() or 1) // jobs)


class JobPool:
    """Runs queued :class:`Job` s, at most ``jobs`` at a time, in child processes.

    :meth:`wait` blocks until one job has finished (starting queued ones as slots free up)
    and returns its state; :meth:`close` stops the children still running.
    """

    def __init__(
        self, folder: Path, jobs: int, cpu: bool, log: Callable[[str], None] = print
    ) -> None:
        if jobs < 1:
            raise MTKDError(f"--jobs must be at least 1, got {jobs}")
        self.folder = folder
        self.jobs = jobs
        self.cpu = cpu
        self.log = log
        self._jobs: dict[str, Job] = {}  # every job added, by key
        self._queued: list[Job] = []
        self._running: dict[str, Job] = {}
        self._finished: dict[str, int] = {}

    def add(self, job: Job) -> None:
        self._jobs[job.key] = job
        self._queued.append(job)

    def __contains__(self, key: str) -> bool:
        """Whether the job ``key`` was added (queued, running or finished)."""
        return key in self._jobs

    def start(self) -> None:
        """Note the children that have ended and start queued jobs in the free slots."""
        self._reap()
        self._fill()

    def wait(self, key: str, stop_requested: Callable[[], bool]) -> str:
        """Block until the job ``key`` has finished; its state ("trained" or "resumed").
        JobsInterrupted (after stopping every child) once ``stop_requested()`` is true;
        MTKDError naming the job's log if it failed."""
        job = self._jobs[key]
        while key not in self._finished:
            if stop_requested():
                self.close()
                raise JobsInterrupted(key)
            self.start()
            if key not in self._finished:
                time.sleep(_POLL_SECONDS)
        status = self._finished[key]
        if status == INTERRUPTED:  # stopped from outside (e.g. SIGTERM to the child alone)
            self.close()
            raise JobsInterrupted(key)
        if status != 0:
            self.close()
            raise MTKDError(
                f"the run {key} failed (exit status {status}); the end of its log "
                f"{job.log}:\n{_tail(job.log)}",
                path=job.run_dir,
            )
        return job.state

    def close(self) -> None:
        """Ask every running child to stop at a safe point (SIGTERM) and wait for it."""
        for job in self._running.values():
            if job.process is not None and job.process.poll() is None:
                job.process.send_signal(signal.SIGTERM)
        for job in list(self._running.values()):
            if job.process is not None:
                job.process.wait()
        self._reap()
        self._queued.clear()

    def _reap(self) -> None:
        for key, job in list(self._running.items()):
            status = job.process.poll() if job.process is not None else None
            if status is not None:
                self._finished[key] = status
                del self._running[key]

    def _fill(self) -> None:
        while self._queued and len(self._running) < self.jobs:
            job = self._queued.pop(0)
            self._start(job)
            self._running[job.key] = job

    def _start(self, job: Job) -> None:
        stem = job.key.removeprefix("cells/").replace("/", "-")
        self.folder.mkdir(parents=True, exist_ok=True)
        config_file = self.folder / f"{stem}.yaml"
        atomic_write_bytes(config_file, dump_config(job.config.with_absolute_paths()).encode())
        command = [sys.executable, "-m", "mtkd", job.config.kind]
        if job.resume:
            command += ["--resume", str(job.run_dir)]
        else:
            command += [str(config_file), "--run-dir", str(job.run_dir)]
        env = dict(os.environ)
        if self.cpu:
            threads = str(threads_per_job(self.jobs))
            env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        job.log = self.folder / f"{stem}.log"
        with open(job.log, "ab") as out:
            job.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a terminal's Ctrl-C reaches the grid only
            )
        what = "resuming from its checkpoint" if job.resume else "a new run"
        self.log(f"started {job.key} ({what}; log {job.log})")


def _tail(path: Path | None) -> str:
    if path is None or not path.is_file():
        return "(no log)"
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(lines[-_LOG_TAIL_LINES:])


__all__ = ["INTERRUPTED", "Job", "JobPool", "JobsInterrupted", "threads_per_job"]
