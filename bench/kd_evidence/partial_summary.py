"""Summarise the finished runs of an evidence grid (a pass that was stopped writes no
summary.json): per cell, the runs finished, the mean test Dice and the paired difference
against ``no_kd`` with its 95 % bootstrap interval, computed as ``mtkd ablate`` computes them
(mtkd.ablation.stats). Sub-cells are reported as they are: no validation choice is made here.

    python bench/kd_evidence/partial_summary.py RUNS.csv [--against CELL]
    python bench/kd_evidence/partial_summary.py ABL [--write RUNS.csv] [--against CELL]

ABL, a grid folder: the rows are read from every run's cached result
(``cells/*/.../report/ablation_result.json``, written when the grid scored the run), across
passes run with different ``--cells``; ``--write`` stores them as a runs.csv. ``--against
CELL`` adds CELL's paired difference against every other cell (e.g. the leader against CWD
and DIST), on the seeds and cases both have.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

from mtkd.ablation.evidence import RUNS_FIELDS, runs_rows
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


def grid_rows(grid: Path) -> list[dict]:
    """runs.csv rows of every scored run of the grid folder ``grid``, cell by cell."""
    results = [
        json.loads(path.read_text(encoding="utf-8"))
        for path in sorted((grid / "cells").glob("**/report/ablation_result.json"))
    ]
    order = {}
    for result in results:
        order.setdefault(result["cell"], len(order))
    if (grid / "cells" / NO_KD).is_dir():
        order[NO_KD] = -1  # the reference first
    results.sort(key=lambda r: (order[r["cell"]], r["split_seed"], r["seed"]))
    return runs_rows(results)


def write_rows(rows: list[dict], path: Path) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RUNS_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({key: row[key] for key in RUNS_FIELDS} for row in rows)


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


def against_lines(rows: list[dict], cell: str) -> list[str]:
    """``cell``'s paired difference against every other cell, on the pairs both have."""
    lines = [
        f"| {cell} against | Δ Dice [95 % CI] (pairs) |",
        "|---|---|",
    ]
    for other in dict.fromkeys(row["cell"] for row in rows):
        if other == cell:
            continue
        diff = paired_difference(rows, cell, other)
        if diff.pairs:
            low, high = diff.ci95
            lines.append(f"| {other} | {diff.mean:+.3f} [{low:+.3f}, {high:+.3f}] ({diff.pairs}) |")
    return lines


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a runs.csv or a grid folder")
    parser.add_argument("--write", type=Path, help="store a grid folder's rows as this runs.csv")
    parser.add_argument("--against", help="a cell compared with every other cell")
    args = parser.parse_args(argv)
    if args.source.is_dir():
        rows = grid_rows(args.source)
        if args.write:
            write_rows(rows, args.write)
            rows = read_rows(args.write)
    elif args.write:
        parser.error("--write needs a grid folder")
    else:
        rows = read_rows(args.source)
    print("\n".join(summary_lines(rows)))
    if args.against:
        if args.against not in {row["cell"] for row in rows}:
            parser.error(f"no runs of the cell {args.against!r}")
        print()
        print("\n".join(against_lines(rows, args.against)))


if __name__ == "__main__":
    main(sys.argv[1:])
