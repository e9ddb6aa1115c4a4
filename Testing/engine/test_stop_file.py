"""Stopping a run through its stop-request file ``RUN/STOP``, the way that needs no console
shared with the run (Slicer on Windows) and no signal: the run saves a checkpoint, ends
"interrupted", removes the file, and resumes; a stale file never stops the next run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, tiny_config

from mtkd.engine.signals import (
    LAUNCHED_AT_ENV,
    STOP_FILE_NAME,
    StopRequest,
    launch_time,
    request_stop,
    stop_file,
)
from mtkd.modelfiles.checkpoint import load_checkpoint
from mtkd.run_folder import read_events


def test_the_stop_file_is_a_request_checked_when_read(tmp_path):
    path = stop_file(tmp_path)
    assert path == tmp_path / STOP_FILE_NAME
    with StopRequest(path) as stop:
        assert not stop.requested
        request_stop(tmp_path)
        assert stop.requested and str(path) in stop.signal_name
    assert not path.exists()  # removed on leaving: the next run starts clean


def test_a_stale_stop_file_is_removed_on_entering(tmp_path):
    path = request_stop(tmp_path)
    before_launch = launch_time() - 60  # written before this process was launched
    os.utime(path, (before_launch, before_launch))
    with StopRequest(stop_file(tmp_path)) as stop:
        assert not stop_file(tmp_path).exists()
        assert not stop.requested


def test_a_stop_requested_while_the_run_starts_up_is_kept(tmp_path):
    """A request written after the process was launched (before the run reads the file)
    stops the run; only a file older than the launch is stale."""
    path = request_stop(tmp_path)
    written = path.stat().st_mtime
    with StopRequest(path, launched_at=written - 5) as stop:
        assert path.exists()
        assert stop.requested
    os.utime(path := request_stop(tmp_path), (written - 60, written - 60))
    with StopRequest(path, launched_at=written - 5) as stop:
        assert not path.exists() and not stop.requested


def test_the_launch_time_comes_from_the_front_end(monkeypatch):
    assert launch_time({LAUNCHED_AT_ENV: "1234.5"}) == 1234.5
    assert launch_time({}) == launch_time({LAUNCHED_AT_ENV: "not a number"}) <= time.time()


def test_without_clear_the_file_is_left_for_the_process_that_owns_it(tmp_path):
    """Ranks other than 0 of a distributed run read the file but never remove it."""
    request_stop(tmp_path)
    with StopRequest(stop_file(tmp_path), clear=False) as stop:
        assert stop.requested
    assert stop_file(tmp_path).exists()


def _train(arguments: list[str]) -> subprocess.Popen:
    """``python -m mtkd train ...`` from this checkout; nobody sends it a signal."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, "-m", "mtkd", "train", *arguments],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
    )


def _events(run: Path) -> list[dict]:
    events = run / "events.jsonl"
    if not events.exists():
        return []
    lines = events.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


@pytest.mark.slow
def test_a_training_run_stopped_by_the_file_alone_checkpoints_and_resumes(slab_dataset, tmp_path):
    run = tmp_path / "run"
    config = tmp_path / "config.yaml"
    epochs = 4
    config.write_text(yaml.safe_dump(tiny_config(slab_dataset, "train", train__epochs=epochs)))
    process = _train([str(config), "--run-dir", str(run)])
    while process.poll() is None and not any(e["type"] == "metrics" for e in _events(run)):
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be asked to stop"
    request_stop(run)  # the file only: no signal is sent
    _, errors = process.communicate(timeout=300)
    assert process.returncode == 130, errors  # the engine's exit status for a stop request
    assert "stop file" in errors
    last = _events(run)[-1]
    assert last["state"] == "interrupted" and STOP_FILE_NAME in last["signal"]
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    stopped_at = (state["epoch"], state["step_in_epoch"])
    assert stopped_at[0] < epochs
    assert not stop_file(run).exists()  # consumed

    request_stop(run)  # a stale request, as if written after the run had ended
    resumed = _train(["--resume", str(run)])
    _, errors = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, errors
    events = read_events(run / "events.jsonl")
    training = [e for e in events if e.get("state") == "training"]
    assert training[-1]["start_epoch"] == stopped_at[0]  # continued from the checkpoint
    epochs_done = [e["epoch"] for e in events if e["type"] == "metrics"]
    assert epochs_done == list(range(1, epochs + 1))  # each epoch exactly once
    assert (run / "model" / "model.pt").is_file()
    assert not stop_file(run).exists()
