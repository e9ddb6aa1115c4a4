"""Run the engine (``python -m mtkd ...``) as a separate process and follow it without blocking.

Both Slicer modules use this: the GUI thread never runs torch; it starts a process, then calls
``poll()`` from a timer. No Qt here, so the same code runs in the tests.

- :class:`BackgroundProcess`: a child process whose output lines are collected by a reader
  thread; ``cancel()`` asks the whole process tree to stop, then kills it.
- :class:`EngineTask`: one ``mtkd`` job with a scratch folder, progress parsed from its
  ``MTKD-PROGRESS`` lines, and a result built on the caller's thread once it succeeds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import queue
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
from typing import Any, Generic, TypeVar

from mtkd.progress import parse_progress

T = TypeVar("T")

_IS_WINDOWS = sys.platform == "win32"
ERROR_PREFIX = "mtkd: error: "


def engine_python() -> str:
    """The interpreter that runs the engine: Slicer's ``PythonSlicer`` when this is Slicer
    (it sets up Slicer's Python environment), else this interpreter."""
    name = "PythonSlicer.exe" if _IS_WINDOWS else "PythonSlicer"
    beside = Path(sys.executable).with_name(name)
    if beside.is_file():
        return str(beside)
    found = shutil.which("PythonSlicer")
    return found or sys.executable


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
    """A child process in its own process group; stdout and stderr merged into lines."""

    def __init__(
        self,
        command: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        keep_lines: int = 200,
    ):
        self.command = list(command)
        self._lines: queue.Queue[str] = queue.Queue()
        self._tail: deque[str] = deque(maxlen=keep_lines)
        options: dict = {"start_new_session": True}
        if _IS_WINDOWS:
            options = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
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
        """The exit status once the process has ended and its output is read; else None."""
        if self._process.poll() is None or self._reader.is_alive():
            return None
        return self._process.returncode

    @property
    def running(self) -> bool:
        return self.returncode is None

    def read_lines(self) -> list[str]:
        """The lines printed since the last call (never blocks)."""
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

    def wait(self, timeout: float | None = None) -> int:
        """Block until the process ends and its output is read; its exit status."""
        self._process.wait(timeout)
        self._reader.join(timeout)
        return self._process.returncode

    def request_stop(self) -> None:
        """Ask the process tree to stop (SIGTERM / CTRL_BREAK: a training run saves a
        checkpoint first); returns at once."""
        if self._process.poll() is None:
            self._signal_tree(soft=True)

    def kill(self) -> None:
        """Kill the whole process tree now (also children left behind by an ended leader)
        and wait for it."""
        self._signal_tree(soft=False)
        self._process.wait()
        self._reader.join(5)

    def cancel(self, grace_seconds: float = 10.0) -> None:
        """:meth:`request_stop`, then :meth:`kill` if the process has not ended after
        ``grace_seconds`` (blocks up to that long)."""
        if self._process.poll() is not None:
            return
        self.request_stop()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(grace_seconds)
        self.kill()

    def _signal_tree(self, soft: bool) -> None:
        try:
            if _IS_WINDOWS:
                if soft:
                    self._process.send_signal(signal.CTRL_BREAK_EVENT)
                else:
                    subprocess.run(
                        ["taskkill", "/F", "/T", "/PID", str(self.pid)], capture_output=True
                    )
            else:
                os.killpg(self.pid, signal.SIGTERM if soft else signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError):
            pass  # it ended meanwhile


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


class EngineTask(Generic[T]):
    """One ``mtkd`` job in its own process, with a scratch folder removed at the end.

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
    ):
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="mtkd-"))
        self.state = TaskState()
        self.result: T | None = None
        self._collect = collect
        try:
            args = prepare(self.workdir)
            self.process = BackgroundProcess(
                engine_command(args, python), env=env or engine_environment()
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
                state.error = error_message(self.process.tail(50), returncode)
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
        """Stop the job (the whole process tree) and remove its scratch folder."""
        if self.state.finished:
            return
        self.process.cancel(grace_seconds=5.0)
        self.process.read_lines()
        self.state.finished, self.state.cancelled = True, True
        self.state.stage = "cancelled"
        self._cleanup()

    def tail(self, count: int = 20) -> list[str]:
        return self.process.tail(count)

    def _cleanup(self) -> None:
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class EngineLogic:
    """Base of the module logics that run engine jobs for the nodes of one MRML ``scene``.

    ``python``/``env``: the interpreter and environment of the engine process (default:
    ``PythonSlicer`` in Slicer, this interpreter elsewhere, with the engine on PYTHONPATH).
    """

    def __init__(self, scene: Any, python: str | None = None, env: dict[str, str] | None = None):
        self.scene = scene
        self.python = python
        self.env = env

    def task(
        self, prepare: Callable[[Path], Sequence[str]], collect: Callable[[Path], T]
    ) -> EngineTask[T]:
        """An :class:`EngineTask` in this logic's engine process settings."""
        return EngineTask(prepare, collect, python=self.python, env=self.env)
