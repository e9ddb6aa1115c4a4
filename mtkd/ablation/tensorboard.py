"""Mirror a run's ``events.jsonl`` into TensorBoard event files (needs ``tensorboard``).

It reads the run folder after the fact, so it works for finished, resumed and running runs
alike; the target folder's previous event files are replaced, never appended to. Tags:
``loss/<term>`` (the total ``loss``, ``seg`` and each distillation term, per epoch),
``val/dice`` and ``val/dice_<structure>``, ``train/lr``, ``train/seconds`` and
``train/samples``; the step is the epoch (0 for the validation of ``model.init_from`` weights
before the first epoch).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mtkd.errors import MTKDError
from mtkd.run_folder import RunDir, read_events

_SKIP = {"type", "time", "epoch", "epochs"}
_RENAME = {
    "val_dice": "val/dice",
    "lr": "train/lr",
    "seconds": "train/seconds",
    "samples": "train/samples",
}


def summary_writer_class():
    """torch's SummaryWriter, or an MTKDError saying how to get it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MTKDError(
            "mirroring to TensorBoard needs the tensorboard package: pip install tensorboard"
        ) from None
    return SummaryWriter


def event_scalars(events: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Step (epoch) -> tag -> value, from a run's events (the last value of a repeated epoch
    wins, as after a crash between an epoch's event and its checkpoint)."""
    steps: dict[int, dict[str, float]] = {}
    for event in events:
        if event.get("type") == "metrics" and isinstance(event.get("epoch"), int):
            step = event["epoch"]
        elif event.get("type") == "status" and event.get("state") == "initial_validation":
            step = 0
        else:
            continue
        scalars: dict[str, float] = {}
        for key, value in event.items():
            if key in _SKIP or key == "state":
                continue
            if key == "val_dice_per_structure" and isinstance(value, dict):
                for name, score in value.items():
                    if _is_number(score):
                        scalars[f"val/dice_{name}"] = float(score)
            elif _is_number(value):
                scalars[_RENAME.get(key, f"loss/{key}")] = float(value)
        steps[step] = scalars
    return steps


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def mirror_run(run_dir: str | Path, log_dir: str | Path) -> int:
    """Write the scalars of ``run_dir``'s events.jsonl to TensorBoard files in ``log_dir``;
    return how many scalars were written."""
    writer_class = summary_writer_class()
    run_dir, log_dir = Path(run_dir), Path(log_dir)
    events = read_events(RunDir(run_dir).events)
    if not events:
        raise MTKDError("no events.jsonl to mirror (not a run folder?)", path=run_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    for stale in log_dir.glob("events.out.tfevents.*"):
        stale.unlink()
    count = 0
    writer = writer_class(log_dir=str(log_dir))
    try:
        for step, scalars in sorted(event_scalars(events).items()):
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, global_step=step)
                count += 1
    finally:
        writer.close()
    return count
