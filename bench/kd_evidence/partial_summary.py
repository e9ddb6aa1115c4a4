"""Summarise the finished runs of an evidence grid from its runs.csv alone (a pass that was
stopped writes no summary.json): per cell, the runs finished, the mean test Dice and the paired
difference against ``no_kd`` with its 95 % bootstrap interval, computed as ``mtkd ablate``
computes them (mtkd.ablation.stats). Sub-cells are reported as they are: no validation choice
is made here.

    python bench/kd_evidence/partial_summary.py bench/results/kd_evidence/s1/runs.csv
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

from mtkd.ablation.stats import case_means, paired_difference, stratified_mean

NO_KD = "no_kd"


def read_rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["split_seed"], row["seed"] = int(row["split_seed"]), int(row["seed"])
        for key in ("dice", "hd95"):
            row[key] = float(row[key]) if row[key] not in ("", "nan") else math.nan
        row["missed"] = int(row["missed"])
    return rows


def summary_lines(rows: list[dict]) -> list[str]:
    cells = list(dict.fromkeys(row["cell"] for row in rows))
    lines = [
        "| cell | runs (split seed: seeds) | test Dice | Δ Dice vs no KD [95 % CI] (pairs) |",
        "|---|---|---|---|",
    ]
    for cell in cells:
        runs: dict[int, set[int]] = {}
        for row in rows:
            if row["cell"] == cell:
                runs.setdefault(row["split_seed"], set()).add(row["seed"])
        shown = "; ".join(f"{k}: {len(v)}" for k, v in sorted(runs.items()))
        dice = stratified_mean(case_means(rows, cell, "dice"))
        delta = "–"
        if cell != NO_KD and any(row["cell"] == NO_KD for row in rows):
            diff = paired_difference(rows, cell, NO_KD)
            if diff.pairs:
                low, high = diff.ci95
                delta = f"{diff.mean:+.3f} [{low:+.3f}, {high:+.3f}] ({diff.pairs})"
        lines.append(f"| {cell} | {shown} | {dice:.3f} | {delta} |")
    return lines


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print("\n".join(summary_lines(read_rows(Path(sys.argv[1])))))
