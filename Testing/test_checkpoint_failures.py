"""A full disk or a read-only run folder while a checkpoint is written: a clear error naming the
file, and the previous checkpoint stays intact (the write goes through a temporary file and an
atomic rename). Root ignores file permissions, so the errors are injected as the real OSErrors
the operating system raises."""

from __future__ import annotations

import errno

import pytest
import torch
from helpers import expect_error

from mtkd.config import RunConfig
from mtkd.engine.trainer import Trainer
from mtkd.errors import MTKDError
from mtkd.modelfiles import checkpoint
from mtkd.modelfiles.checkpoint import load_checkpoint, save_checkpoint
from mtkd.run_folder import read_events


def failing_save(code: int, message: str):
    """torch.save that writes part of the file, then fails as the OS would."""

    def save(state, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError(code, message)

    return save


@pytest.mark.parametrize(
    "code, message",
    [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")],
)
def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, code, message):
    path = tmp_path / "checkpoints" / "last.pt"
    path.parent.mkdir()
    previous = {"format": "mtkd-checkpoint", "kind": "train", "epoch": 3, "x": torch.arange(4)}
    save_checkpoint(previous, path)
    monkeypatch.setattr(checkpoint.torch, "save", failing_save(code, message))
    with expect_error(path, message):
        save_checkpoint({**previous, "epoch": 4}, path)
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["epoch"] == 3 and torch.equal(state["x"], torch.arange(4))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no leftovers


def test_a_run_that_cannot_save_stops_with_the_error(make_config, tmp_path, monkeypatch):
    config = make_config("train", multitask={"reconstruction": "none"}, train__epochs=3)
    run_dir = tmp_path / "run"
    trainer = Trainer(RunConfig.from_dict(config), run_dir, progress=False, log=lambda _: None)
    saves = []
    real_save = checkpoint.torch.save

    def full_disk_after_first_epoch(state, path, *args, **kwargs):
        saves.append(state.get("epoch"))
        if len([e for e in saves if e is not None]) > 2:  # last + best of epoch 1 went through
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(state, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk_after_first_epoch)
    with pytest.raises(MTKDError, match="No space left on device"):
        trainer.run()
    monkeypatch.undo()
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["epoch"] == 1  # the last complete checkpoint, readable
    events = read_events(run_dir / "events.jsonl")
    assert events[-1]["type"] == "error" and "No space left" in events[-1]["message"]
