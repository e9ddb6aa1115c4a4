"""Do the teacher's tapped features know more than the student's? A linear read-out of each.

    python bench/kd_evidence/feature_probe.py GRID OUT.json [--cell paper] [--data COHORT] \
        [--teacher RUN] [--split-seed J] [--trained RUN] [--fit-batches 40] [--steps 300]

The feature terms of a cell ask the student's map at a tap to carry what the teacher's map at
the paired tap carries. That can only help where the teacher's map holds segmentation
information the student's does not. For every tap pair of the cell (the run set up as
``mtkd ablate`` would, see ``gradient_probe.py``), this fits a linear classifier of the
structures on the voxels of each map (the labels resized to the map by nearest neighbour): on
the teacher's map, on the student's at its random initialisation and, with ``--trained RUN``
(a finished run of the same student, e.g. the grid's ``no_kd`` run), on the trained student's.
The classifiers learn on slices of the run's training cases (class-balanced voxels, at most
``--voxels`` per class) and are scored on every slice of its validation cases: the mean Dice
of the structures at the map's resolution, and the pixel accuracy. All networks run in eval
mode; the features are standardised on the training voxels.

OUT.json holds every figure; the table is printed as Markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench script

from gradient_probe import run_set_up  # noqa: E402

from mtkd.ablation.grid_config import load_ablation  # noqa: E402
from mtkd.data.atomic import atomic_write_bytes  # noqa: E402
from mtkd.data.loading import SliceDataset  # noqa: E402
from mtkd.devices import resolve_device  # noqa: E402
from mtkd.errors import MTKDError  # noqa: E402
from mtkd.infer.inference import repeat_channels  # noqa: E402
from mtkd.modelfiles.checkpoint import load_checkpoint  # noqa: E402
from mtkd.models.taps import FeatureRecorder  # noqa: E402


def tap_voxels(
    network: torch.nn.Module, tap: str, images: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The map of ``tap`` for images (B, C, H, W) as voxels (N, C_tap), and each voxel's
    label (N,) from labels (B, 1, H, W) resized to the map by nearest neighbour."""
    with torch.no_grad(), FeatureRecorder(network, [tap]) as recorder:
        network(images)
    features = recorder.features[tap].float().cpu()
    resized = F.interpolate(labels.float(), size=features.shape[2:], mode="nearest").long()
    channels = features.shape[1]
    return features.movedim(1, -1).reshape(-1, channels), resized.reshape(-1)


def balanced_sample(
    features: torch.Tensor, labels: torch.Tensor, classes: int, cap: int, generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """At most ``cap`` voxels of each class, drawn at random."""
    keep = []
    for value in range(classes):
        index = torch.nonzero(labels == value).flatten()
        if len(index) > cap:
            index = index[torch.randperm(len(index), generator=generator)[:cap]]
        keep.append(index)
    chosen = torch.cat(keep)
    return features[chosen], labels[chosen]


def fit_read_out(
    features: torch.Tensor, labels: torch.Tensor, classes: int, steps: int
) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    """A linear classifier (C -> classes) of standardised features (N, C); with the mean and
    standard deviation it standardises with."""
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    inputs = (features - mean) / std
    read_out = torch.nn.Linear(features.shape[1], classes)
    optimizer = torch.optim.AdamW(read_out.parameters(), lr=0.05, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(read_out(inputs), labels).backward()
        optimizer.step()
    return read_out, mean, std


def read_out_scores(
    network: torch.nn.Module,
    tap: str,
    fit_loader: DataLoader,
    val_loader: DataLoader,
    prepare,
    classes: int,
    args: argparse.Namespace,
) -> dict[str, float]:
    """Fit a read-out of ``tap`` on the training slices, score it on the validation slices:
    mean Dice over the structures present, and pixel accuracy."""
    generator = torch.Generator().manual_seed(0)
    fit_features, fit_labels = [], []
    for index, batch in enumerate(fit_loader):
        if index == args.fit_batches:
            break
        features, labels = tap_voxels(network, tap, prepare(batch["image"]), batch["label"])
        features, labels = balanced_sample(features, labels, classes, args.voxels, generator)
        fit_features.append(features)
        fit_labels.append(labels)
    features, labels = torch.cat(fit_features), torch.cat(fit_labels)
    features, labels = balanced_sample(features, labels, classes, args.voxels, generator)
    read_out, mean, std = fit_read_out(features, labels, classes, args.steps)
    intersection = torch.zeros(classes)
    predicted = torch.zeros(classes)
    actual = torch.zeros(classes)
    correct = total = 0
    for batch in val_loader:
        features, labels = tap_voxels(network, tap, prepare(batch["image"]), batch["label"])
        with torch.no_grad():
            guess = read_out((features - mean) / std).argmax(1)
        for value in range(classes):
            intersection[value] += ((guess == value) & (labels == value)).sum()
            predicted[value] += (guess == value).sum()
            actual[value] += (labels == value).sum()
        correct += int((guess == labels).sum())
        total += labels.numel()
    present = [v for v in range(1, classes) if actual[v] > 0]
    if not present:
        raise MTKDError("the validation cases hold none of the structures: nothing to score")
    dice = [float(2 * intersection[v] / (predicted[v] + actual[v])) for v in present]
    return {"dice": sum(dice) / len(dice), "accuracy": correct / total}


def probe(ablation: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The read-out scores of every tap pair of the cell, per network."""
    cells = {cell.name: cell for cell in ablation.cells}
    config = ablation.run_config(cells[args.cell], 0, args.split_seed).with_absolute_paths()
    device = resolve_device(args.device or config.train.device)
    results: dict[str, Any] = {"config": config.name, "pairs": {}}
    with run_set_up(config, device) as (data, models, _):
        distiller = models.distiller
        data.cache.warm(data.split.val)
        classes = len(data.labels.label_values) + 1
        fit_loader = DataLoader(
            SliceDataset(data.cache, data.train_ids, None),
            batch_size=config.train.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(0),
        )
        val_loader = DataLoader(
            SliceDataset(data.cache, data.split.val, None), batch_size=config.train.batch_size
        )
        student_channels = data.prep.in_channels
        teacher_channels = distiller.teacher_in_channels or student_channels

        def for_student(images: torch.Tensor) -> torch.Tensor:
            return repeat_channels(images, student_channels).to(device)

        def for_teacher(images: torch.Tensor) -> torch.Tensor:
            return repeat_channels(images, teacher_channels).to(device)

        networks = {"teacher": (distiller.teacher, for_teacher)}
        initial = {k: v.clone() for k, v in distiller.student.state_dict().items()}
        networks["student (initialisation)"] = (distiller.student, for_student)
        if args.trained:
            networks["student (trained)"] = (distiller.student, for_student)
        for label, pair in zip(distiller.labels, distiller.pairs):
            row = {}
            for name, (network, prepare) in networks.items():
                if name == "student (trained)":
                    checkpoint = Path(args.trained) / "checkpoints" / "best.pt"
                    network.load_state_dict(load_checkpoint(checkpoint)["model"])
                elif name.startswith("student"):
                    network.load_state_dict(initial)
                network.eval()
                tap = pair.teacher if name == "teacher" else pair.student
                row[name] = {
                    "tap": tap,
                    **read_out_scores(network, tap, fit_loader, val_loader, prepare, classes, args),
                }
            results["pairs"][label] = row
    return results


def markdown(results: dict[str, Any]) -> str:
    """One row per tap pair and network."""
    lines = [
        "| pair | network | tap | read-out Dice | pixel accuracy |",
        "|---|---|---|---|---|",
    ]
    for label, row in results["pairs"].items():
        for name, scores in row.items():
            lines.append(
                f"| {label} | {name} | {scores['tap']} | {scores['dice']:.3f} | "
                f"{scores['accuracy']:.3f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("grid", help="an evidence grid config, e.g. bench/kd_evidence/s1.yaml")
    parser.add_argument("output", type=Path, help="the JSON file to write")
    parser.add_argument("--cell", default="paper", help="the cell whose tap pairs to probe")
    parser.add_argument("--data", help="replace data.source (the cohort folder)")
    parser.add_argument("--teacher", help="replace distill.teacher ({split_seed} allowed)")
    parser.add_argument(
        "--split-seed", type=int, help="the runs' split seed (default: the grid's first)"
    )
    parser.add_argument("--trained", help="a finished run folder of the same student")
    parser.add_argument("--fit-batches", type=int, default=40, help="training batches read")
    parser.add_argument("--voxels", type=int, default=4000, help="voxels per class to fit on")
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps of a read-out")
    parser.add_argument("--device", help="cpu, cuda, ... (default: the grid's)")
    args = parser.parse_args(argv)
    ablation = load_ablation(args.grid, data_source=args.data, teacher=args.teacher)
    if args.cell not in {cell.name for cell in ablation.cells}:
        names = sorted(cell.name for cell in ablation.cells)
        print(f"unknown cell {args.cell!r}; the grid has {names}", file=sys.stderr)
        return 2
    if args.split_seed is None and ablation.split_seeds is not None:
        args.split_seed = ablation.split_seeds[0]
    results = probe(ablation, args)
    atomic_write_bytes(args.output, (json.dumps(results, indent=1) + "\n").encode())
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
