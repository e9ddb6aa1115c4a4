"""A long-lived engine process (``mtkd serve``) that runs the Slicer modules' engine jobs.

Starting ``PythonSlicer -m mtkd segment ...`` for every Apply costs a new process, the torch
and MONAI imports and the model loading before anything is computed. An :class:`EngineWorker`
starts ``mtkd serve`` once (on its first job; the protocol is described in
:mod:`mtkd.cli.serve`) and sends it each job as the same ``mtkd`` command line as before; the
worker keeps the models it loaded, so a second Apply with the same model starts at once.

- :class:`WorkerJob`: one job on the worker, followed as :class:`MTKDLib.process.EngineTask`
  follows a process (``read_lines``, ``returncode``, ``tail``, ``cancel``).
- :class:`EngineWorker`: the worker process and its jobs, one at a time, in order. Cancel
  stops a job at its next stage and the worker stays; a job that does not stop within the
  grace period has the worker killed (it is started again for the next job). A worker that
  dies fails its job with a message that says so, and the next job starts a new one.
- :func:`shared_worker`: the one worker of a Slicer session, used by both modules: MTKD
  Segment's segment and compare logics, and MTKD Train's scoring of the loop's versions
  (``mtkd evaluate`` jobs, :class:`MTKDLib.loop_scores.ScoringJob`); training runs stay
  processes of their own. :func:`stop_shared_worker` ends it when no module still has a job
  on it (each module calls it when it is cleaned up, e.g. when Slicer quits, after cancelling
  its own jobs; a job of the other module keeps it, and the next job after a stop starts a
  new one). The worker also ends by itself when its input closes, e.g. when Slicer dies.

No Qt and no torch here: replies are read by threads, and the caller polls.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import queue
import signal
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from MTKDLib.process import engine_command, engine_environment, kill_tree, popen_keywords

CANCEL_GRACE_SECONDS = 15.0  # a cancelled job not ended by then: the worker is killed
STOP_GRACE_SECONDS = 10.0  # an idle worker asked to stop and still there: killed
KEEP_LINES = 200
CANCELLED_STATUS = 130


def stopped_message(returncode: int | None, last_lines: Sequence[str] = ()) -> str:
    """What a job that the worker's death ended says, with the worker's last stderr lines."""
    how = f"exit code {returncode}"
    if returncode is not None and returncode < 0:
        with contextlib.suppress(ValueError):
            how += f", {signal.Signals(-returncode).name}"
    text = f"the MTKD engine worker stopped ({how}); it will be restarted for the next job"
    return "\n".join([text, *list(last_lines)[-5:]])


class WorkerJob:
    """One job sent to an :class:`EngineWorker`: the lines it printed and how it ended.

    ``reply``: the worker's ``done`` reply (``models_loaded``, ``models_reused``, ``seconds``;
    empty until then and when the worker died); ``worker_pid``: the worker that ran it.
    """

    def __init__(self, worker: EngineWorker, job_id: str, argv: Sequence[str]):
        self.worker = worker
        self.job_id = job_id
        self.argv = [str(word) for word in argv]
        self.error: str | None = None
        self.cancelled = False
        self.reply: dict[str, Any] = {}
        self.worker_pid: int | None = None
        self._returncode: int | None = None
        self._on_end: Callable[[], None] | None = None
        self._lines: queue.Queue[str] = queue.Queue()
        self._tail: deque[str] = deque(maxlen=KEEP_LINES)
        self._lock = threading.Lock()
        self._ended = threading.Event()

    @property
    def returncode(self) -> int | None:
        """``mtkd``'s exit status for the job once it has ended (130 cancelled), else None."""
        return self._returncode

    @property
    def running(self) -> bool:
        return self._returncode is None

    def read_lines(self) -> list[str]:
        """The lines printed since the last call (never blocks)."""
        lines = []
        with contextlib.suppress(queue.Empty):
            while True:
                lines.append(self._lines.get_nowait())
        return lines

    def tail(self, count: int = 20) -> list[str]:
        """The last ``count`` lines the job printed."""
        with self._lock:
            return list(self._tail)[-count:]

    def error_message(self) -> str:
        """Why the job failed (the engine's message, naming the file)."""
        return self.error or f"the MTKD job ended with exit status {self._returncode}"

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the job has ended (or ``timeout``); its exit status."""
        self._ended.wait(timeout)
        return self._returncode

    def cancel(self, grace_seconds: float = 0.0, on_end: Callable[[], None] | None = None) -> None:
        """Ask the worker to stop the job at its next stage; returns at once. The worker is
        killed if the job has not ended after the longer of ``grace_seconds`` and the
        worker's ``cancel_grace``. ``on_end`` is called once the job has ended."""
        self.worker.cancel(self, grace_seconds, on_end)

    # --- called by the worker, holding its lock
    def _add_line(self, line: str) -> None:
        with self._lock:
            self._tail.append(line)
        self._lines.put(line)

    def _end(
        self, returncode: int, error: str | None = None, reply: dict | None = None
    ) -> Callable[[], None] | None:
        """Record the end; the ``on_end`` callback to call (outside the worker's lock). An end
        that the engine did not reply (the worker died, was stopped...) is also the job's last
        line, so that its output says why it ended as a process's would."""
        if self._returncode is not None:
            return None
        if reply is None and error:
            self._add_line(error)
        self.reply = dict(reply or {})
        self.cancelled = self.cancelled or bool(self.reply.get("cancelled"))
        self.error = error if returncode != 0 else None
        self._returncode = returncode
        self._ended.set()
        return self._on_end


class WorkerProcess:
    """One ``mtkd serve`` process: requests written to its stdin; two threads read its replies
    (``on_reply(self, reply)``) and stderr lines (``on_stderr(self, line)``), and
    ``on_exit(self, returncode)`` follows once it has ended."""

    def __init__(
        self,
        command: Sequence[str],
        env: dict[str, str],
        on_reply: Callable[[WorkerProcess, dict], None],
        on_stderr: Callable[[WorkerProcess, str], None],
        on_exit: Callable[[WorkerProcess, int], None],
    ):
        self.worker_pid: int | None = None  # the engine's own pid, from its "ready" reply
        self.stderr_tail: deque[str] = deque(maxlen=20)
        self._on_reply, self._on_stderr, self._on_exit = on_reply, on_stderr, on_exit
        self._write_lock = threading.Lock()
        self.popen = subprocess.Popen(
            list(command),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **popen_keywords(),
        )
        self._stderr_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_reader.start()
        threading.Thread(target=self._read_replies, daemon=True).start()

    @property
    def pid(self) -> int:
        """The engine's pid once it said so, else the started process's (e.g. a launcher)."""
        return self.worker_pid or self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def send(self, request: dict[str, Any]) -> bool:
        """Write one request; False when the worker can no longer read."""
        try:
            with self._write_lock:
                self.popen.stdin.write(json.dumps(request) + "\n")
                self.popen.stdin.flush()
            return True
        except (OSError, ValueError):  # its end of the pipe is closed
            return False

    def close_input(self) -> None:
        """End the worker's input: it ends (cancelling what runs)."""
        with self._write_lock, contextlib.suppress(OSError):
            self.popen.stdin.close()

    def kill(self) -> None:
        """Kill the worker and anything it started, now."""
        if self.alive:
            kill_tree(self.popen.pid)

    def _read_replies(self) -> None:
        for line in self.popen.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                reply = json.loads(line)
            except ValueError:
                reply = None
            if isinstance(reply, dict):
                self._on_reply(self, reply)
            else:  # not the protocol (it should not happen): shown as output
                self._on_stderr(self, line)
        self._stderr_reader.join(5)
        self._on_exit(self, self.popen.wait())

    def _read_stderr(self) -> None:
        for line in self.popen.stderr:
            line = line.rstrip("\r\n")
            self.stderr_tail.append(line)
            self._on_stderr(self, line)


class EngineWorker:
    """Runs ``mtkd`` jobs (``segment``, ``compare``, ``evaluate``) on one ``mtkd serve``
    process, started on the first job (``python``/``env`` as
    :class:`MTKDLib.process.EngineTask`'s) and again after it died. :meth:`run` is an
    :data:`MTKDLib.process.JobRunner`."""

    def __init__(
        self,
        python: str | None = None,
        env: dict[str, str] | None = None,
        cancel_grace: float = CANCEL_GRACE_SECONDS,
    ):
        self.python = python
        self.env = env
        self.cancel_grace = cancel_grace
        self.starts = 0  # worker processes started so far
        self._process: WorkerProcess | None = None
        self._current: WorkerJob | None = None
        self._waiting: deque[WorkerJob] = deque()
        self._ids = itertools.count(1)
        self._lock = threading.RLock()

    @property
    def pid(self) -> int | None:
        """The running worker's pid (None when there is none)."""
        process = self._process
        return process.pid if process is not None and process.alive else None

    def run(self, argv: Sequence[str]) -> WorkerJob:
        """Send the job ``argv`` (``["segment", ...]``, ``["compare", ...]`` or
        ``["evaluate", ...]``); it runs once the jobs sent before it have ended. Starts the
        worker if none runs."""
        job = WorkerJob(self, f"j{next(self._ids)}", argv)
        with self._lock:
            self._waiting.append(job)
            ended = self._dispatch()
        _call(ended)
        return job

    def cancel(
        self, job: WorkerJob, grace_seconds: float = 0.0, on_end: Callable[[], None] | None = None
    ) -> None:
        """See :meth:`WorkerJob.cancel`."""
        with self._lock:
            job.cancelled = True
            if job.returncode is not None:
                ended = [on_end]
            elif job in self._waiting:  # never sent: it never runs
                self._waiting.remove(job)
                job._on_end = on_end
                ended = [job._end(CANCELLED_STATUS, "cancelled")]
            else:
                job._on_end = on_end
                process = self._process
                if process is not None and job is self._current:
                    process.send({"cancel": job.job_id})
                    grace = max(grace_seconds, self.cancel_grace)
                    timer = threading.Timer(grace, self._cancel_overdue, args=(job, process))
                    timer.daemon = True
                    timer.start()
                ended = []
        _call(ended)

    def stop(self, if_unused: bool = False) -> WorkerProcess | None:
        """End the worker without waiting: an idle one is told (its input closes) and killed
        if still there after a few seconds; a busy one is killed at once. What was sent and
        has not ended fails. The next :meth:`run` starts a new worker. Returns the process
        being stopped (None: none ran, or it was kept). ``if_unused``: keep the worker while
        a job that was not cancelled runs or waits (another module's)."""
        with self._lock:
            jobs = [job for job in (self._current, *self._waiting) if job is not None]
            if if_unused and not all(job.cancelled for job in jobs):
                return None
            process, self._process = self._process, None
            self._current = None
            self._waiting.clear()
            ended = [job._end(1, "the MTKD engine worker was stopped") for job in jobs]
        if process is not None:
            if jobs:
                process.kill()
            else:
                process.close_input()
                timer = threading.Timer(STOP_GRACE_SECONDS, process.kill)
                timer.daemon = True
                timer.start()
        _call(ended)
        return process

    def kill(self) -> None:
        """Kill the worker process now, as a crash would (its job fails; the next job starts a
        new worker)."""
        process = self._process
        if process is not None:
            process.kill()

    # --- the worker's replies, on its reader threads
    def _dispatch(self) -> list[Callable[[], None] | None]:
        """Send the next waiting job if none runs (starting a worker if needed). Holds the
        lock; returns the ``on_end`` callbacks of the jobs that ended here."""
        ended: list[Callable[[], None] | None] = []
        while self._current is None and self._waiting:
            job = self._waiting.popleft()
            if self._process is None or not self._process.alive:
                try:
                    self._process = self._start()
                except Exception as error:  # noqa: BLE001 - e.g. no interpreter: the job says so
                    ended.append(job._end(1, f"the MTKD engine worker could not start: {error}"))
                    continue
            self._current = job
            job.worker_pid = self._process.pid
            self._process.send({"id": job.job_id, "argv": job.argv})  # failing: on_exit says
        return ended

    def _start(self) -> WorkerProcess:
        self.starts += 1
        return WorkerProcess(
            engine_command(["serve"], self.python),
            self.env or engine_environment(),
            self._on_reply,
            self._on_stderr,
            self._on_exit,
        )

    def _on_reply(self, process: WorkerProcess, reply: dict) -> None:
        ended: list[Callable[[], None] | None] = []
        with self._lock:
            if process is not self._process:
                return  # a worker that was stopped or replaced
            job = self._current
            if reply.get("ready"):
                process.worker_pid = reply.get("pid")
                if job is not None:
                    job.worker_pid = process.pid
            elif job is None or reply.get("id") != job.job_id:
                process.stderr_tail.append(json.dumps(reply))  # not ours: kept for the record
            elif "line" in reply:
                job._add_line(str(reply["line"]))
            elif "done" in reply:
                status = reply["done"] if isinstance(reply["done"], int) else 1
                ended.append(job._end(status, reply.get("error"), reply))
                self._current = None
                ended += self._dispatch()
        _call(ended)

    def _on_stderr(self, process: WorkerProcess, line: str) -> None:
        with self._lock:
            if process is self._process and self._current is not None:
                self._current._add_line(line)

    def _on_exit(self, process: WorkerProcess, returncode: int) -> None:
        ended: list[Callable[[], None] | None] = []
        with self._lock:
            if process is not self._process:
                return
            self._process = None
            job, self._current = self._current, None
            if job is not None:
                status = returncode if returncode else 1
                ended.append(job._end(status, stopped_message(returncode, process.stderr_tail)))
            ended += self._dispatch()  # the jobs waiting get a new worker
        _call(ended)

    def _cancel_overdue(self, job: WorkerJob, process: WorkerProcess) -> None:
        with self._lock:
            overdue = job is self._current and process is self._process
        if overdue:
            process.kill()  # its exit ends the job; the next job starts a new worker


def _call(callbacks: list[Callable[[], None] | None]) -> None:
    for callback in callbacks:
        if callback is not None:
            callback()


_shared: EngineWorker | None = None
_shared_lock = threading.Lock()


def shared_worker() -> EngineWorker:
    """The one worker of this session (created here; its process starts on the first job)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = EngineWorker()
        return _shared


def stop_shared_worker() -> None:
    """End the session's worker process, if any, without waiting for it, unless a job that
    was not cancelled runs or waits on it (the other module's: it goes on)."""
    with _shared_lock:
        worker = _shared
    if worker is not None:
        worker.stop(if_unused=True)
