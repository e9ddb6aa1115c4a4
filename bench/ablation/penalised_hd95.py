"""Bounds on the penalised mean HD95 of an ablation scored before missed structures counted.

Before the missed-structure penalty, `mtkd ablate` averaged HD95 over the finite distances only,
and its results.csv keeps, per run and structure, the Dice and the HD95 averaged over the test
volumes where the structure was found. The per-volume outcomes were not kept, so the penalised
mean can only be bounded, assuming every test volume's reference holds every structure (true
of the synthetic cohort):

- a structure with no HD95 (NaN) was missed in every test volume: it scores the penalty;
- one with an HD95 was found at least once; it was missed in k volumes, 0 <= k <= floor(n (1 -
  Dice)) (a missed volume scores Dice 0, a found one at most 1); k = 0 gives the lower bound,
  the largest k the upper one.

    python bench/ablation/penalised_hd95.py bench/results/ablation/s1_results.csv \\
        --cases 6 --image runs/bench-ablation/cohort/labelsTr/synth_003.nii.gz

prints a Markdown table per cell: the old HD95 (excludes missed structures), the structure-
volumes known to be missed per run, and the penalised mean HD95's bounds (mean over seeds).
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from mtkd.ablation.report import mean_std
from mtkd.metrics import image_diagonal_mm


def number(text: str) -> float:
    return math.nan if text in ("", "nan") else float(text)


def run_bounds(row: dict[str, str], cases: int, penalty: float) -> dict[str, float]:
    """Known missed structure-volumes and the penalised mean HD95's bounds of one run."""
    structures = [key[len("dice_") :] for key in row if key.startswith("dice_")]
    known, low, high = 0, [], []
    for name in structures:
        dice, hd95 = number(row[f"dice_{name}"]), number(row[f"hd95_mm_{name}"])
        if math.isnan(hd95):  # no finite distance in any test volume
            known += cases
            low.append(penalty)
            high.append(penalty)
            continue
        most = min(cases - 1, math.floor(cases * (1.0 - dice) + 1e-9))
        low.append(hd95)
        high.append(((cases - most) * hd95 + most * penalty) / cases)
    return {
        "known_missed": known,
        "low": sum(low) / len(low),
        "high": sum(high) / len(high),
    }


def cell_table(rows: list[dict[str, str]], cases: int, penalty: float) -> str:
    cells: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        cells.setdefault(row["cell"], []).append(row)
    lines = [
        "| cell | seeds | HD95 (mm), excludes missed | missed per run (known) "
        "| penalised HD95 (mm), lower bound | upper bound |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in cells.items():
        bounds = [run_bounds(run, cases, penalty) for run in runs]
        old = mean_std([number(run["hd95_mm"]) for run in runs])
        known = mean_std([b["known_missed"] for b in bounds])[0]
        low = mean_std([b["low"] for b in bounds])
        high = mean_std([b["high"] for b in bounds])[0]
        lines.append(
            f"| {name} | {len(runs)} | {_pm(old)} | {known:.1f} | {_pm(low)} | {high:.1f} |"
        )
    return "\n".join(lines)


def _pm(pair: tuple[float, float]) -> str:
    mean, std = pair
    return f"{mean:.1f}" if not math.isfinite(std) else f"{mean:.1f} ± {std:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="an ablation's results.csv")
    parser.add_argument("--cases", type=int, required=True, help="number of test volumes")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--image", type=Path, help="a test volume: its diagonal is the penalty")
    where.add_argument("--penalty-mm", type=float, help="the penalty distance in mm")
    args = parser.parse_args()
    penalty = args.penalty_mm
    if args.image is not None:
        import SimpleITK as sitk

        image = sitk.ReadImage(str(args.image))
        penalty = image_diagonal_mm(image.GetSize(), image.GetSpacing())
    with open(args.results, newline="") as handle:
        rows = list(csv.DictReader(handle))
    print(f"penalty {penalty:.1f} mm, {args.cases} test volumes\n")
    print(cell_table(rows, args.cases, penalty))


if __name__ == "__main__":
    main()
