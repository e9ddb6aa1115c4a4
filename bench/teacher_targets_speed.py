"""Training time of one cell of an evidence grid with the teacher's logits computed on every
batch (``distill.teacher_targets: online``) and once per training image (``precomputed``).

    python bench/teacher_targets_speed.py bench/kd_evidence/s3d.yaml --cell hinton_unlabelled \\
        --data runs/kd-evidence/cohort \\
        --teacher runs/kd-evidence/teachers/cohort/teacher3d-split0 \\
        --epochs 4 --out bench/results/teacher_targets_speed_cpu_2core.json

Trains the cell's run (split seed 0, seed 0) for ``--epochs`` epochs each way in a scratch
folder, without validation after the initial one, and reports from ``events.jsonl`` the
seconds from start to the first epoch (data, teacher and, precomputed, its pass over the
training images) and the mean seconds of the epochs after the first. The teacher may be any
teacher ``mtkd distill`` takes (a checkpoint of an unfinished teacher times the same).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mtkd.ablation.grid_config import load_ablation
from mtkd.config import RunConfig
from mtkd.data.atomic import atomic_write_bytes
from mtkd.engine.trainer import Trainer
from mtkd.run_folder import read_events

WAYS = ("online", "precomputed")


def timed_run(config: RunConfig, run_dir: Path) -> dict:
    """Train ``config`` in ``run_dir``; its setup seconds and the seconds of each epoch."""
    started = time.time()
    Trainer(config, run_dir, progress=False, log=lambda _: None).run()
    events = read_events(run_dir / "events.jsonl")
    epochs = [e for e in events if e["type"] == "metrics"]
    first_epoch_start = epochs[0]["time"] - epochs[0]["seconds"]
    return {
        "setup_seconds": round(first_epoch_start - started, 2),
        "epoch_seconds": [round(e["seconds"], 2) for e in epochs],
        "samples_per_epoch": epochs[0].get("samples"),
    }


def cell_config(args: argparse.Namespace, way: str) -> RunConfig:
    """The cell's run (split seed 0, seed 0) for ``args.epochs`` epochs, ``way`` targets."""
    ablation = load_ablation(args.grid, data_source=args.data, teacher=args.teacher)
    (cell,) = [cell for cell in ablation.cells if cell.name == args.cell]
    data = ablation.run_config(cell, ablation.seeds[0], ablation.splits[0]).to_dict()
    data["train"].update(epochs=args.epochs, val_every=args.epochs + 1, patience=None)
    data["distill"]["teacher_targets"] = way
    return RunConfig.from_dict(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("grid", type=Path, help="an evidence grid config (bench/kd_evidence)")
    parser.add_argument("--cell", required=True, help="a cell whose output term alone weighs")
    parser.add_argument("--data", type=Path, required=True, help="the grid's cohort")
    parser.add_argument("--teacher", type=Path, required=True, help="the teacher of split 0")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True, help="the JSON to write")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for way in WAYS:
            results[way] = timed_run(cell_config(args, way), Path(scratch) / way)
            later = results[way]["epoch_seconds"][1:] or results[way]["epoch_seconds"]
            results[way]["mean_epoch_seconds_after_first"] = round(statistics.mean(later), 2)
            print(way, results[way], flush=True)
    speedup = (
        results["online"]["mean_epoch_seconds_after_first"]
        / results["precomputed"]["mean_epoch_seconds_after_first"]
    )
    record = {
        "grid": str(args.grid),
        "cell": args.cell,
        "epochs": args.epochs,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "ways": results,
        "epoch_speedup": round(speedup, 2),
    }
    atomic_write_bytes(args.out, (json.dumps(record, indent=2) + "\n").encode())
    print(f"epochs after the first: {speedup:.2f}x faster with precomputed targets")


if __name__ == "__main__":
    main()
