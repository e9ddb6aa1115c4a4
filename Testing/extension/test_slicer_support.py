"""The Slicer-side support code, run for real: the background process runner (output, exit
status, cancelling a whole process tree), and the dependency check and install plan."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from MTKDLib.dependencies import (
    PROTECTED,
    confirmation_text,
    environment_task,
    failure_text,
    installed_version,
    missing_requirements,
    pip_arguments,
    protected_constraints,
    read_requirements,
)
from MTKDLib.process import (
    BackgroundProcess,
    EngineTask,
    engine_command,
    engine_environment,
    engine_python,
    error_message,
    kill_tree_command,
    popen_options,
    soft_stop_signal,
)

PYTHON = sys.executable


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (ended, not yet reaped) counts as gone
        status = Path(f"/proc/{pid}/status").read_text()
        return "\nState:\tZ" not in status
    except OSError:
        return True


def wait_until(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_output_lines_and_exit_status():
    process = BackgroundProcess([PYTHON, "-c", "print('one'); print('two'); raise SystemExit(3)"])
    assert process.wait(60) == 3
    assert process.read_lines() == ["one", "two"]
    assert process.returncode == 3 and not process.running
    assert process.tail(1) == ["two"]


@pytest.mark.skipif(sys.platform == "win32", reason="process groups are POSIX here")
def test_cancel_returns_at_once_and_polling_kills_the_tree_after_the_grace_period(tmp_path):
    """The child ignores SIGTERM (as a busy process might) and has a grandchild: cancel()
    returns while the child still runs (the GUI thread never waits), and once the grace
    period has passed the whole tree is killed; nothing is left running."""
    pid_file = tmp_path / "grandchild.pid"
    script = textwrap.dedent(
        f"""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print("ready", flush=True)
        time.sleep(600)
        """
    )
    process = BackgroundProcess([PYTHON, "-c", script])
    assert wait_until(lambda: "ready" in process.tail(5))
    grandchild = int(pid_file.read_text())
    assert alive(grandchild)
    process.cancel(grace_seconds=3.0)
    assert alive(process.pid) and process.returncode is None  # cancel did not wait for it
    assert wait_until(lambda: process.returncode is not None, 60)
    assert process.returncode == -signal.SIGKILL
    assert wait_until(lambda: not alive(grandchild), 10), "the grandchild survived"


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM semantics are POSIX here")
def test_cancel_asks_politely_first():
    """A process that handles SIGTERM (a training run saving its checkpoint) gets to finish."""
    script = textwrap.dedent(
        """
        import signal, sys, time
        def stop(*_):
            print("saved checkpoint", flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        print("ready", flush=True)
        time.sleep(600)
        """
    )
    process = BackgroundProcess([PYTHON, "-c", script])
    assert wait_until(lambda: "ready" in process.tail(5))
    process.cancel(grace_seconds=60.0)
    assert wait_until(lambda: process.returncode is not None, 60)
    assert process.returncode == 0
    assert "saved checkpoint" in process.tail(5)


def test_request_stop_creates_the_stop_file_and_a_stale_one_is_removed_first(tmp_path):
    """The stop file reaches a child that ignores signals (as one without a console on
    Windows is never sent any); a file left from before does not count."""
    stop = tmp_path / "STOP"
    stop.write_text("stale")
    script = textwrap.dedent(
        f"""
        import os, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("stale file:", os.path.exists({str(stop)!r}), flush=True)
        print("launched at", os.environ["MTKD_LAUNCHED_AT"], flush=True)
        while not os.path.exists({str(stop)!r}):
            time.sleep(0.02)
        print("stop file seen", flush=True)
        """
    )
    stale_written = stop.stat().st_mtime
    process = BackgroundProcess([PYTHON, "-c", script], stop_file=stop)
    assert wait_until(lambda: any("launched at" in line for line in process.tail(5)))
    assert "stale file: False" in process.tail(5)
    launched = float(process.tail(5)[-1].split()[-1])  # told to the engine: see mtkd.engine.signals
    assert stale_written <= launched
    assert process.request_stop() is True
    assert process.wait(60) == 0
    assert process.tail(1) == ["stop file seen"]


def test_engine_task_cancel_returns_at_once_and_cleans_up_after_the_process_ends():
    task = EngineTask(lambda _workdir: ["env", "--json"], lambda _workdir: None, python=PYTHON)
    task.cancel()
    state = task.poll()
    assert state.finished and state.cancelled and not state.succeeded
    assert wait_until(lambda: not task.workdir.exists(), 60)
    assert wait_until(lambda: task.process.returncode is not None, 60)


# ------------------------------------------------------------------ Windows, built here


def test_windows_children_start_hidden_without_a_console_in_their_own_group():
    options = popen_options("win32")
    # the Windows API's values: CREATE_NO_WINDOW 0x08000000, CREATE_NEW_PROCESS_GROUP 0x200,
    # STARTF_USESHOWWINDOW 1, SW_HIDE 0 (what slicer.util.launchConsoleProcess sets)
    assert options == {
        "creationflags": 0x08000000 | 0x00000200,
        "startupinfo": {"dwFlags": 1, "wShowWindow": 0},
    }
    for name in ("CREATE_NO_WINDOW", "CREATE_NEW_PROCESS_GROUP"):  # where defined (Windows)
        if hasattr(subprocess, name):
            assert options["creationflags"] & getattr(subprocess, name)
    assert "start_new_session" not in options  # a POSIX-only Popen option
    assert popen_options("linux") == popen_options("darwin") == {"start_new_session": True}


def test_windows_stop_and_kill_commands():
    assert kill_tree_command(4242, "win32") == ["taskkill", "/F", "/T", "/PID", "4242"]
    assert kill_tree_command(4242, "linux") is None
    assert soft_stop_signal("win32") is None  # no console to send CTRL_BREAK to: the file
    assert soft_stop_signal("linux") == signal.SIGTERM


def test_windows_engine_command_runs_pythonslicer_exe_beside_slicer(tmp_path):
    bin_folder = tmp_path / "Slicer 5.12.0" / "bin"
    bin_folder.mkdir(parents=True)
    (bin_folder / "PythonSlicer.exe").write_bytes(b"")
    python = engine_python("win32", executable=str(bin_folder / "SlicerApp-real.exe"))
    assert python == str(bin_folder / "PythonSlicer.exe")
    command = engine_command(["segment", "C:\\My Models\\student", "--device", "cuda:1"], python)
    line = subprocess.list2cmdline(command)  # what CreateProcess receives
    assert line.startswith(f'"{bin_folder / "PythonSlicer.exe"}" -m mtkd segment ')
    assert line.endswith('"C:\\My Models\\student" --device cuda:1')


def test_error_message_prefers_the_engines_own_line():
    lines = ["loading", "mtkd: error: /x/model: model not found", "exit"]
    assert error_message(lines, 2) == "/x/model: model not found"
    assert "exit status 1" in error_message(["Traceback", "ValueError: boom"], 1)
    assert "ValueError: boom" in error_message(["Traceback", "ValueError: boom"], 1)


def test_engine_environment_puts_this_engine_first():
    env = engine_environment({"PYTHONPATH": "/elsewhere"})
    paths = env["PYTHONPATH"].split(os.pathsep)
    assert Path(paths[0]) == ROOT  # the folder holding mtkd/ in this checkout
    assert "/elsewhere" in paths and env["PYTHONUNBUFFERED"] == "1"


def test_engine_task_collects_on_success_and_cleans_up():
    collected = []

    def prepare(workdir: Path) -> list[str]:
        (workdir / "input.txt").write_text("x")
        return ["--version"]

    task = EngineTask(prepare, lambda workdir: collected.append(workdir) or "result",
                      python=PYTHON)  # fmt: skip
    assert task.wait(120) == "result"
    assert collected == [task.workdir] and not task.workdir.exists()
    assert any(line.startswith("mtkd ") for line in task.tail())


def test_requirements_are_satisfied_here_and_gaps_are_found():
    requirements = read_requirements()
    assert requirements and all(not line.startswith("#") for line in requirements)
    assert missing_requirements(requirements) == []  # the test environment has them all

    def without_monai(name: str) -> str | None:
        return None if name == "monai" else installed_version(name)

    def old_einops(name: str) -> str | None:
        return "0.6.0" if name == "einops" else installed_version(name)

    assert missing_requirements(requirements, without_monai) == ["monai>=1.4,<1.7"]
    assert missing_requirements(requirements, old_einops) == ["einops>=0.7,<1"]
    assert missing_requirements(["numpy>=1; python_version < '3'"]) == []  # marker false


def test_constraints_pin_slicers_own_packages(tmp_path):
    text = protected_constraints()
    pinned = dict(line.split("==") for line in text.splitlines() if "==" in line)
    assert pinned["numpy"] == installed_version("numpy")
    assert pinned["SimpleITK"] == installed_version("SimpleITK")
    assert pinned["torch"] == installed_version("torch")
    assert set(pinned) <= set(PROTECTED)


def test_pip_accepts_the_plan_and_refuses_to_replace_numpy(tmp_path):
    """Real pip, offline: the requirements under the constraints need no change here, and a
    requirement that would replace Slicer's numpy cannot be met."""
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(protected_constraints())
    pip = [PYTHON, "-m", "pip", "install", "--dry-run", "--no-index", "--quiet"]
    result = subprocess.run(
        [*pip, *pip_arguments(read_requirements(), constraints)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    numpy = installed_version("numpy")
    result = subprocess.run(
        [*pip, *pip_arguments([f"numpy!={numpy}"], constraints)], capture_output=True, text=True
    )
    assert result.returncode != 0 and "numpy" in result.stderr


def test_dialog_texts_name_the_packages_and_how_to_retry():
    missing = ["monai>=1.4,<1.7", "einops>=0.7,<1"]
    ask = confirmation_text(missing)
    assert all(line in ask for line in missing) and "numpy" in ask and "SimpleITK" in ask
    failed = failure_text(missing, "ERROR: network unreachable")
    assert "monai einops" in failed and "network unreachable" in failed
    assert "PythonSlicer -m pip install" in failed and "retry" in failed.lower()


def test_environment_check_runs_in_its_own_process():
    report = environment_task(python=PYTHON).wait(120)
    assert report["torch"] == torch.__version__
    assert report["cuda_available"] is torch.cuda.is_available()
    json.dumps(report)
