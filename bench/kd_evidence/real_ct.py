"""Score every finished run of an evidence grid, and its teachers, on the bundled real CT.

    python bench/kd_evidence/real_ct.py ABL CSV [--teacher RUN ...] [--device cpu]

ABL is a grid folder of ``mtkd ablate`` (``ABL/cells/<cell>/[split<j>/]seed<k>/``); CSV gets one
row per run and structure: ``cell,split_seed,seed,structure,dice,hd95``, rewritten after every
run, and a run already in CSV is not scored again (the script resumes). Each ``--teacher`` run
folder is scored as cell ``teacher`` with its split seed read from its name (``...-split<j>``).
Prints the mean Dice per cell (over runs, of the mean over structures). A run restored from the
grid's archive (``archive.py``) has no weights: it is left out, its rows being those already in
CSV.

The real CT is ``Testing/Data/abdomen_ct.nii.gz`` (abdomen and pelvis, 3 mm) with its
TotalSegmentator labels (``abdomen_seg_total_fast.nii.gz``, named by ``labels_total_v2.json``),
matched to the models' structures by name. It is an external check of how CT-like the phantoms
are (issue #15), not a target: the label map is a model's output, not a manual reference.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import statistics
import sys
import tempfile
from pathlib import Path

from mtkd.data.atomic import atomic_write_bytes
from mtkd.data.datasets import load_dataset
from mtkd.devices import resolve_device
from mtkd.infer.evaluate import evaluate
from mtkd.infer.predictor import Predictor
from mtkd.modelfiles.files import WEIGHTS
from mtkd.modelfiles.model_io import load_model
from mtkd.run_folder import FINISHED, RunDir

DATA = Path(__file__).resolve().parents[2] / "Testing" / "Data"
FIELDS = ["cell", "split_seed", "seed", "structure", "dice", "hd95"]


def real_ct_dataset(folder: Path):
    """The bundled CT and its label map as a folder-pairs dataset in ``folder``."""
    for sub, name in (("images", "abdomen_ct.nii.gz"), ("labels", "abdomen_seg_total_fast.nii.gz")):
        (folder / sub).mkdir(parents=True)
        (folder / sub / "abdomen.nii.gz").symlink_to(DATA / name)
    return load_dataset(folder, labels_json=DATA / "labels_total_v2.json")


def grid_runs(grid: Path) -> list[tuple[str, str, str, Path]]:
    """(cell, split seed, seed, run folder) of every finished run of the grid."""
    runs = []
    for metadata in sorted((grid / "cells").glob("**/model/mtkd_model.json")):
        run = metadata.parent.parent
        parts = run.relative_to(grid / "cells").parts  # cell, [split<j>,] seed<k>
        split = parts[-2].removeprefix("split") if len(parts) == 3 else ""
        runs.append((parts[0], split, parts[-1].removeprefix("seed"), run))
    return runs


def with_weights(runs: list[tuple[str, str, str, Path]], done: set, csv_path: Path):
    """The runs of ``runs`` that hold their weights. Says how many do not (restored from the
    grid's archive: their rows are in CSV) and warns of those without rows (not in ``done``)."""
    kept = [run for run in runs if (RunDir(run[3]).model / WEIGHTS).is_file()]
    restored = [run[:3] for run in runs if run not in kept]
    if restored:
        print(f"{len(restored)} run(s) restored from the archive (no weights here): not scored")
    unscored = [" ".join(run) for run in restored if run not in done]
    if unscored:
        print(
            f"warning: {len(unscored)} restored run(s) have no rows in {csv_path} and cannot "
            f"be scored without their weights: {', '.join(unscored)}",
            file=sys.stderr,
        )
    return kept


def teacher_runs(teachers: list[str]) -> list[tuple[str, str, str, Path]]:
    found = []
    for teacher in teachers:
        match = re.search(r"split(\d+)$", Path(teacher).name)
        found.append(("teacher", match.group(1) if match else "", "", Path(teacher)))
    return found


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("grid", type=Path)
    parser.add_argument("csv", type=Path)
    parser.add_argument("--teacher", action="append", default=[])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    rows = list(csv.DictReader(args.csv.open(encoding="utf-8"))) if args.csv.is_file() else []
    done = {(r["cell"], r["split_seed"], r["seed"]) for r in rows}
    with tempfile.TemporaryDirectory() as scratch:
        dataset = real_ct_dataset(Path(scratch))
        runs = teacher_runs(args.teacher) + with_weights(grid_runs(args.grid), done, args.csv)
        for cell, split, seed, run in runs:
            if (cell, split, seed) in done or RunDir(run).state != FINISHED:
                continue
            scores = evaluate(Predictor(load_model(run, device), device), dataset, ["abdomen"])
            rows += [
                {
                    "cell": cell,
                    "split_seed": split,
                    "seed": seed,
                    "structure": s.structure,
                    "dice": f"{s.dice:.6f}",
                    "hd95": f"{s.hd95_mm:.3f}",
                }
                for s in scores
            ]
            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=FIELDS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
            args.csv.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(args.csv, text.getvalue().encode())
    per_run: dict[tuple[str, str, str], list[float]] = {}
    for row in rows:
        per_run.setdefault((row["cell"], row["split_seed"], row["seed"]), []).append(
            float(row["dice"])
        )
    per_cell: dict[str, list[float]] = {}
    for (cell, _, _), dice in per_run.items():
        per_cell.setdefault(cell, []).append(statistics.fmean(dice))
    for cell, means in per_cell.items():
        print(f"{cell}: real-CT Dice {statistics.fmean(means):.3f} over {len(means)} run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
