"""Run the engine (``python -m mtkd ...``) as a separate process and follow it without blocking.

Both Slicer modules use this: the GUI thread never runs torch; it starts a process, then calls
``poll()`` from a timer. No Qt here, so the same code runs in the tests.

- :class:`BackgroundProcess`: a child process whose output lines are collected by a reader
  thread; ``cancel()`` asks the whole process tree to stop and returns at once; the tree is
  killed once the grace period has passed.
- :class:`EngineTask`: one ``mtkd`` job with a scratch folder, progress parsed from its
  ``MTKD-PROGRESS`` lines, and a result built on the caller's thread once it succeeds. The job
  runs in a process of its own, or on a long-lived worker (:mod:`MTKDLib.worker`) when the
  logic was given one.

On Windows the child starts without a console window (as ``slicer.util.launchConsoleProcess``
starts its processes), so it shares no console with Slicer and cannot be sent CTRL_BREAK: a
training run is asked to stop through its stop-request file (:mod:`mtkd.engine.signals`), the
same on every OS; on POSIX it also gets SIGTERM. What is built for Windows is decided by pure
functions of the platform name (:func:`popen_options`, :func:`kill_tree_command`, ...), so it
is tested on any OS.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from mtkd.engine.signals import LAUNCHED_AT_ENV
from mtkd.engine.signals import request_stop as write_stop_file
from mtkd.processes import pid_exists
from mtkd.progress import parse_progress

T = TypeVar("T")

ERROR_PREFIX = "mtkd: error: "
# Windows process-creation flags and STARTUPINFO fields (values of the Windows API; the
# subprocess module defines them only on Windows)
CREATE_NEW_PROCESS_GROUP = 0x00000200
CREATE_NO_WINDOW = 0x08000000
STARTF_USESHOWWINDOW = 0x00000001
SW_HIDE = 0
CANCEL_GRACE_SECONDS = 10.0


def is_windows(platform: str | None = None) -> bool:
    return (sys.platform if platform is None else platform) == "win32"


def engine_python(platform: str | None = None, executable: str | None = None) -> str:
    """The interpreter that runs the engine: Slicer's ``PythonSlicer`` beside ``executable``
    (default: this interpreter) when this is Slicer (it sets up Slicer's Python environment),
    else ``executable``."""
    executable = executable or sys.executable
    name = "PythonSlicer.exe" if is_windows(platform) else "PythonSlicer"
    beside = Path(executable).with_name(name)
    if beside.is_file():
        return str(beside)
    found = shutil.which("PythonSlicer")
    return found or executable


def popen_options(platform: str | None = None) -> dict[str, Any]:
    """How a child starts on ``platform`` (default: this one), as ``subprocess.Popen``
    keywords: on POSIX in its own session (its process group is its tree); on Windows in its
    own process group, with no console window (CREATE_NO_WINDOW) and hidden (STARTUPINFO
    ``dwFlags``/``wShowWindow``, given here as a dict of those two fields)."""
    if is_windows(platform):
        return {
            "creationflags": CREATE_NO_WINDOW | CREATE_NEW_PROCESS_GROUP,
            "startupinfo": {"dwFlags": STARTF_USESHOWWINDOW, "wShowWindow": SW_HIDE},
        }
    return {"start_new_session": True}


def popen_keywords(platform: str | None = None) -> dict[str, Any]:
    """:func:`popen_options` for this OS, with the STARTUPINFO object made (Windows only)."""
    options = popen_options(platform)
    fields = options.pop("startupinfo", None)
    if fields is not None:
        info = subprocess.STARTUPINFO()  # type: ignore[attr-defined]  # Windows only
        for name, value in fields.items():
            setattr(info, name, value)
        options["startupinfo"] = info
    return options


def kill_tree_command(pid: int, platform: str | None = None) -> list[str] | None:
    """The command that kills process ``pid`` and all its children on Windows (None on
    POSIX, where the process group is killed with a signal)."""
    if is_windows(platform):
        return ["taskkill", "/F", "/T", "/PID", str(pid)]
    return None


def kill_tree(pid: int) -> None:
    """Kill process ``pid`` and all its children now: its process group on POSIX (it was
    started in a session of its own), ``taskkill /T`` on Windows."""
    command = kill_tree_command(pid)
    if command is not None:
        subprocess.run(command, capture_output=True, **popen_keywords())
    else:
        with contextlib.suppress(OSError):  # it ended meanwhile
            os.killpg(pid, int(signal.SIGKILL))


def soft_stop_signal(platform: str | None = None) -> int | None:
    """The signal that asks a process group to stop on ``platform``: SIGTERM on POSIX; None
    on Windows, where a child without a console cannot be sent CTRL_BREAK (its stop file is
    the way there)."""
    return None if is_windows(platform) else int(signal.SIGTERM)


def engine_pythonpath() -> str:
    """The folder that holds the ``mtkd`` package (inside Slicer: the extension's scripted
    modules folder, which the child interpreter does not search by itself)."""
    spec = importlib.util.find_spec("mtkd")
    if spec is None or spec.origin is None:
        raise RuntimeError("the MTKD engine (package 'mtkd') is not installed")
    return str(Path(spec.origin).resolve().parent.parent)


def engine_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the engine on PYTHONPATH and
    unbuffered output, so that progress lines arrive as they are printed."""
    env = dict(os.environ if base is None else base)
    paths = [engine_pythonpath(), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def engine_command(args: Sequence[str], python: str | None = None) -> list[str]:
    """``[python, "-m", "mtkd", *args]``."""
    return [python or engine_python(), "-m", "mtkd", *map(str, args)]


class BackgroundProcess:
    """A child process in its own process group (no console window on Windows); stdout and
    stderr merged into lines.

    ``stop_file``: the stop-request file of the run the process works on (see
    :mod:`mtkd.engine.signals`); :meth:`request_stop` creates it. A stale one is removed
    before the process starts, and the process is told when that was (``$MTKD_LAUNCHED_AT``),
    so that it keeps a request made while it starts up.
    """

    def __init__(
        self,
        command: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        keep_lines: int = 200,
        stop_file: str | Path | None = None,
    ):
        self.command = list(command)
        self.stop_file = Path(stop_file) if stop_file is not None else None
        self._lines: queue.Queue[str] = queue.Queue()
        self._tail: deque[str] = deque(maxlen=keep_lines)
        self._kill_at: float | None = None  # set by cancel(): when to kill the tree
        self._killed = False
        if self.stop_file is not None:
            with contextlib.suppress(OSError):
                self.stop_file.unlink(missing_ok=True)
            env = {**(os.environ if env is None else env), LAUNCHED_AT_ENV: repr(time.time())}
        options = popen_keywords()
        self._process = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **options,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self._lines.put(line.rstrip("\r\n"))
        self._process.stdout.close()

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has ended and its output is read; else None.
        After :meth:`cancel`, kills the tree once the grace period has passed."""
        self._kill_when_due()
        if self._process.poll() is None or self._reader.is_alive():
            return None
        return self._process.returncode

    @property
    def running(self) -> bool:
        return self.returncode is None

    def read_lines(self) -> list[str]:
        """The lines printed since the last call (never blocks)."""
        self._kill_when_due()
        lines = []
        while True:
            try:
                lines.append(self._lines.get_nowait())
            except queue.Empty:
                break
        self._tail.extend(lines)
        return lines

    def tail(self, count: int = 20) -> list[str]:
        """The last ``count`` lines read so far."""
        self.read_lines()
        return list(self._tail)[-count:]

    def error_message(self) -> str:
        """Why the ended process failed: the engine's own error line, else its last lines."""
        return error_message(self.tail(50), self.returncode)

    def wait(self, timeout: float | None = None) -> int:
        """Block until the process ends and its output is read; its exit status."""
        self._process.wait(timeout)
        self._reader.join(timeout)
        return self._process.returncode

    def request_stop(self) -> bool:
        """Ask the process tree to stop (a training run saves a checkpoint first): create the
        stop file when there is one, and send SIGTERM to the group on POSIX. Returns at once;
        False when there was no way to ask (Windows without a stop file) or it has ended."""
        if self._process.poll() is not None:
            return False
        asked = False
        if self.stop_file is not None:
            with contextlib.suppress(OSError):  # e.g. the folder is gone: the signal remains
                write_stop_file(self.stop_file.parent)
                asked = True
        soft = soft_stop_signal()
        if soft is not None:
            self._signal_group(soft)
            asked = True
        return asked

    def kill(self) -> None:
        """Kill the whole process tree now (also children left behind by an ended leader)
        and wait for it (at once: nothing can delay a kill)."""
        self._kill_tree()
        self._process.wait()
        self._reader.join(5)

    def cancel(
        self,
        grace_seconds: float = CANCEL_GRACE_SECONDS,
        on_end: Callable[[], None] | None = None,
    ) -> None:
        """:meth:`request_stop`, and kill the tree if the process has not ended after
        ``grace_seconds`` (at once when it cannot be asked). Never blocks: the kill happens in
        :meth:`read_lines`/:attr:`returncode` once due, or in a watchdog thread for a caller
        that stops polling; that thread calls ``on_end`` once the process has ended."""
        if self._kill_at is not None:
            return
        grace = grace_seconds if self.request_stop() else 0.0
        self._kill_at = time.monotonic() + grace
        threading.Thread(target=self._watchdog, args=(grace, on_end), daemon=True).start()

    def _watchdog(self, grace: float, on_end: Callable[[], None] | None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(grace)
        if self._process.poll() is None:
            self._kill_when_due(force=True)
        elif kill_tree_command(self.pid) is None:
            self._signal_group(int(signal.SIGKILL))  # children left behind by the leader
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(60)
        if on_end is not None:
            on_end()

    def _kill_when_due(self, force: bool = False) -> None:
        due = self._kill_at is not None and (force or time.monotonic() >= self._kill_at)
        if due and not self._killed and self._process.poll() is None:
            self._killed = True
            self._kill_tree()

    def _kill_tree(self) -> None:
        kill_tree(self.pid)

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(OSError):  # it ended meanwhile
            os.killpg(self.pid, signum)


@dataclass
class TaskState:
    """What a front end shows: progress (0..1), the stage, new output lines, and the end."""

    fraction: float = 0.0
    stage: str = "starting"
    new_lines: list[str] = field(default_factory=list)
    finished: bool = False
    succeeded: bool = False
    cancelled: bool = False
    error: str | None = None


def error_message(lines: Sequence[str], returncode: int | None) -> str:
    """The engine's own error line when it printed one, else the last output lines."""
    for line in reversed(lines):
        if line.startswith(ERROR_PREFIX):
            return line[len(ERROR_PREFIX) :]
    last = [line for line in lines if line.strip()][-5:]
    detail = "\n".join(last) if last else "no output"
    return f"the MTKD process ended with exit status {returncode}:\n{detail}"


class EngineJob(Protocol):
    """A running ``mtkd`` job as :class:`EngineTask` follows it: a :class:`BackgroundProcess`
    or a job on a worker (:class:`MTKDLib.worker.WorkerJob`)."""

    @property
    def returncode(self) -> int | None: ...  # None until it has ended and its lines are read

    def read_lines(self) -> list[str]: ...

    def tail(self, count: int = 20) -> list[str]: ...

    def error_message(self) -> str: ...

    def cancel(self, grace_seconds: float = ..., on_end: Callable[[], None] | None = None): ...


JobRunner = Callable[[Sequence[str]], EngineJob]  # engine arguments -> the job, started


class EngineTask(Generic[T]):
    """One ``mtkd`` job, with a scratch folder removed at the end: in a process of its own,
    or started by ``runner`` (e.g. :meth:`MTKDLib.worker.EngineWorker.run`).

    ``prepare(workdir)`` runs first, on the caller's thread (e.g. writes the input volume) and
    returns the engine arguments; ``collect(workdir)`` builds the result once the process has
    succeeded, also on the caller's thread (e.g. loads MRML nodes). Nothing else touches the
    scene, so a cancelled or failed task leaves it as it was.
    """

    def __init__(
        self,
        prepare: Callable[[Path], Sequence[str]],
        collect: Callable[[Path], T],
        python: str | None = None,
        env: dict[str, str] | None = None,
        workdir: str | Path | None = None,
        runner: JobRunner | None = None,
    ):
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="mtkd-"))
        self.state = TaskState()
        self.result: T | None = None
        self._collect = collect
        try:
            args = prepare(self.workdir)
            self.process: EngineJob = (
                runner(args)
                if runner is not None
                else BackgroundProcess(
                    engine_command(args, python), env=env or engine_environment()
                )
            )
        except BaseException:
            self._cleanup()
            raise

    def poll(self) -> TaskState:
        """Read new output and update the state; collects the result when the job succeeded.
        Never blocks on the process."""
        state = self.state
        if state.finished:
            state.new_lines = []
            return state
        state.new_lines = self.process.read_lines()
        for line in state.new_lines:
            update = parse_progress(line)
            if update is not None:
                state.fraction, state.stage = update.fraction, update.stage
        returncode = self.process.returncode
        if returncode is None:
            return state
        state.new_lines += self.process.read_lines()
        state.finished = True
        try:
            if returncode != 0:
                state.error = self.process.error_message()
                return state
            state.stage = "loading the results"
            self.result = self._collect(self.workdir)
            state.succeeded, state.fraction, state.stage = True, 1.0, "done"
        except Exception as error:  # noqa: BLE001 - shown to the user, scene untouched
            state.error = f"{type(error).__name__}: {error}"
        finally:
            self._cleanup()
        return state

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> T:
        """Poll until the job ends; its result, or RuntimeError with the job's error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.poll().finished:
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"MTKD job did not finish within {timeout} s")
            time.sleep(interval)
        if not self.state.succeeded:
            raise RuntimeError(self.state.error or "the MTKD job failed")
        return self.result  # type: ignore[return-value]

    def cancel(self) -> None:
        """Stop the job (the whole process tree, killed if it has not ended after a few
        seconds; on a worker, the job at its next stage) and remove its scratch folder once it
        has ended. Returns at once."""
        if self.state.finished:
            return
        self.process.read_lines()
        self.state.finished, self.state.cancelled = True, True
        self.state.stage = "cancelled"
        self.process.cancel(grace_seconds=5.0, on_end=self._cleanup)

    def tail(self, count: int = 20) -> list[str]:
        return self.process.tail(count)

    def _cleanup(self) -> None:
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class EngineLogic:
    """Base of the module logics that run engine jobs for the nodes of one MRML ``scene``.

    ``python``/``env``: the interpreter and environment of the engine process (default:
    ``PythonSlicer`` in Slicer, this interpreter elsewhere, with the engine on PYTHONPATH).
    ``worker``: an :class:`MTKDLib.worker.EngineWorker` that runs the jobs (it has its own
    interpreter and environment); None: a new process for every job.
    """

    def __init__(
        self,
        scene: Any,
        python: str | None = None,
        env: dict[str, str] | None = None,
        worker: Any | None = None,
    ):
        self.scene = scene
        self.python = python
        self.env = env
        self.worker = worker

    def task(
        self, prepare: Callable[[Path], Sequence[str]], collect: Callable[[Path], T]
    ) -> EngineTask[T]:
        """An :class:`EngineTask` on this logic's worker, or in a process of its own."""
        runner = self.worker.run if self.worker is not None else None
        return EngineTask(prepare, collect, python=self.python, env=self.env, runner=runner)


# ---------------------------------------------------------------- liveness
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
