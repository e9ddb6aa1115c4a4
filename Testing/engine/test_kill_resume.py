"""Kill anywhere, lose nothing: a training process is killed with SIGKILL again and again (at
random moments, in the middle of a checkpoint write, in the middle of an event line) and
resumed each time; every checkpoint stays loadable, ``events.jsonl`` stays readable, every
resume starts from the last complete checkpoint, and the final model is bit for bit the model
of a run that was never interrupted."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT

from mtkd.modelfiles.checkpoint import load_checkpoint
from mtkd.run_folder import read_events

DRIVER = ROOT / "Testing" / "crash_injection.py"
EPOCHS = 16
# One process per step. "startup": killed at a random moment of its first seconds (loading,
# caching, the first epoch); "random": at a random moment of the epoch after its first one
# (training, validation, checkpoint and event writes alike); "checkpoint", "event": it kills
# itself half-way through writing its first checkpoint or metrics event.
PLAN = ["startup", "random", "checkpoint", "random", "event", "random", "random"]


def _launch(run: Path, config: Path, crash: str | None) -> subprocess.Popen:
    """``mtkd train`` (or ``--resume`` once a checkpoint exists), optionally crash-injected."""
    if (run / "checkpoints" / "last.pt").is_file():
        arguments = ["train", "--resume", str(run)]
    else:
        arguments = ["train", str(config), "--run-dir", str(run)]
    program = [str(DRIVER), crash] if crash else ["-m", "mtkd"]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, *program, *arguments],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": path},  # the driver imports mtkd from this tree
    )


def _lines(events: Path) -> list[str]:
    return events.read_text(encoding="utf-8").splitlines() if events.exists() else []


def _wait_for_an_epoch(process: subprocess.Popen, events: Path, seen: int) -> None:
    """Until this process has finished an epoch (or ended)."""
    while process.poll() is None:
        new = [json.loads(line) for line in _lines(events)[seen:] if _parses(line)]
        if any(e["type"] == "metrics" for e in new):
            return
        time.sleep(0.02)


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def _checkpoint_epoch(run: Path) -> int | None:
    """The epoch of ``last.pt`` (None before the first); it must load (weights-only)."""
    path = run / "checkpoints" / "last.pt"
    return load_checkpoint(path)["epoch"] if path.exists() else None


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model" / "model.pt", weights_only=True)


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_gives_the_uninterrupted_model(make_config, tmp_path):
    config = make_config("train", train__epochs=EPOCHS, train__batch_size=2)
    config["data"]["slice_size"] = [64, 64]  # a few tenths of a second per epoch
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))

    straight = tmp_path / "straight"
    done = subprocess.run(
        [sys.executable, "-m", "mtkd", "train", str(path), "--run-dir", str(straight)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]

    run, events = tmp_path / "killed", tmp_path / "killed" / "events.jsonl"
    draw = random.Random(20261126)
    epochs_seen, torn_lines, kills = [], 0, 0
    for crash in PLAN:
        before = _checkpoint_epoch(run)
        seen = len(_lines(events)) if before is not None else 0  # a fresh start clears them
        injected = crash in ("checkpoint", "event")
        process = _launch(run, path, crash if injected else None)
        if not injected:
            if crash == "random":
                _wait_for_an_epoch(process, events, seen)
            time.sleep(draw.uniform(0.0, 0.8 if crash == "random" else 8.0))
            process.send_signal(signal.SIGKILL)
        _, stderr = process.communicate(timeout=300)
        if process.returncode == 0:  # finished before the kill: nothing left to interrupt
            break
        assert process.returncode == -signal.SIGKILL, stderr[-2000:]
        kills += 1

        after = _checkpoint_epoch(run)  # loads, so it is not corrupt
        assert after is None or before is None or after >= before
        if crash == "checkpoint":  # killed half-way through writing last.pt
            partial = list((run / "checkpoints").glob(".tmp-*last.pt"))
            assert len(partial) == 1 and after == before
        new = _lines(events)[seen:]
        if crash == "event":
            assert not _parses(new[-1])  # the half line it left
            torn_lines += 1
        assert all(_parses(line) for line in new[:-1])  # only the last line can be torn
        started = [json.loads(line) for line in new if _parses(line)]
        for event in started:
            if event.get("state") == "training":  # resumed from the last complete checkpoint
                assert event["start_epoch"] == (before or 0)
                epochs_seen.append(event["start_epoch"])
        assert len(read_events(events)) == sum(_parses(line) for line in _lines(events))

    assert kills >= 5
    assert max(epochs_seen, default=0) > 0  # at least one resume started past epoch 0
    final = _launch(run, path, None)
    _, stderr = final.communicate(timeout=600)
    assert final.returncode == 0, stderr[-2000:]

    lines = _lines(events)
    torn = [line for line in lines if not _parses(line)]
    assert len(torn) >= torn_lines  # (a random kill may tear a line too)
    assert all(line.count('{"type"') == 1 for line in torn)  # ended alone, no event swallowed
    history = [e for e in read_events(events) if e["type"] == "metrics"]
    assert sorted({e["epoch"] for e in history}) == list(range(1, EPOCHS + 1))
    assert read_events(events)[-1]["type"] == "done"
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the partial file was cleaned up
    a, b = _weights(straight), _weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
