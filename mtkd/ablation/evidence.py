"""The grid's evidence files: per-case scores (``runs.csv``), the per-method summary with paired
differences against no KD and the validation-chosen recipe (``summary.json``), and its Markdown
table (``evidence.md``).

``runs.csv`` has one row per (cell, split seed, seed, test case, structure) of every finished
run, sub-cells of a sweep included under their full names, with the columns
``cell,split_seed,seed,case,structure,dice,hd95,missed`` (``hd95`` in mm, the image's diagonal
for a missed or spurious structure; ``missed`` 1 where the model left a structure of the
reference empty).

Selection uses validation only. Each run's validation score is its best validation Dice (the
epoch its exported model comes from). A swept method's reported sub-cell is the one with the
highest mean validation Dice over its runs (seeds x split seeds; with
``ablation.sweep_selection`` over the selection runs only, which every sub-cell has, while the
chosen one also ran the others, and the method's validation Dice is then the chosen one's mean
over all its runs); ``recommended`` is the
reported method (``no_kd`` included, the teacher not) with the highest mean validation Dice.
Test scores are reported for the chosen sub-cells only and never feed a choice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mtkd.ablation.grid import NO_KD, TEACHER, SweepSelection
from mtkd.ablation.stats import (
    DEFAULT_REPLICATES,
    DEFAULT_SEED,
    case_means,
    paired_difference,
    stratified_mean,
)

RUNS_FIELDS = ["cell", "split_seed", "seed", "case", "structure", "dice", "hd95", "missed"]
SELECTION = (
    "sub-cell of a sweep and recommended cell: highest mean over runs (seeds x split seeds) of "
    "each run's best validation Dice; test scores are not used"
)
BOOTSTRAP = (
    "paired per (split_seed, seed, case, structure), mean over structures per case; percentile "
    "bootstrap stratified by split seed, resampling seeds and cases (crossed) with replacement "
    "within each split seed (mtkd/ablation/stats.py)"
)


def case_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``runs.csv`` rows of one run result (its ``cases``)."""
    fixed = {"cell": result["cell"], "split_seed": result["split_seed"], "seed": result["seed"]}
    return [
        {**fixed, **{key: case[key] for key in RUNS_FIELDS[3:]}}
        for case in result.get("cases") or []
    ]


def runs_rows(results: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``runs.csv`` rows of every student run (the teacher left out), in ``results`` order;
    one run per (cell, split seed, seed), the last given wins."""
    runs = {(r["cell"], r["split_seed"], r["seed"]): r for r in results if r.get("role") != TEACHER}
    return [row for result in runs.values() for row in case_rows(result)]


def _mean(values: list[Any]) -> float:
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return float(np.mean(numbers)) if numbers else math.nan


def choose_sub_cells(
    results: list[Mapping[str, Any]], selection: SweepSelection | None = None
) -> dict[str, dict[str, Any]]:
    """Method (family) -> {"chosen": cell, "val_dice": mean, "sweep": {cell: mean} or None},
    each method's cell with the highest mean validation Dice (the first on a tie, or when no
    run has one). With ``selection`` a sub-cell is compared on the selection runs only, and
    the method's ``val_dice`` is then its chosen sub-cell's mean over all its runs (the runs
    beyond the selection were not chosen on, which tempers the chosen mean's optimism)."""
    by_method: dict[str, dict[str, list[Any]]] = {}
    every: dict[str, list[Any]] = {}  # cell -> the validation Dice of all its runs
    for result in results:
        if result.get("role") == TEACHER:
            continue
        every.setdefault(result["cell"], []).append(result.get("val_dice"))
        swept = (result.get("method") or result["cell"]) != result["cell"]
        if swept and selection and not selection.covers(result["split_seed"], result["seed"]):
            continue
        method = result.get("method") or result["cell"]
        by_method.setdefault(method, {}).setdefault(result["cell"], []).append(
            result.get("val_dice")
        )
    choices = {}
    for method, cells in by_method.items():
        means = {cell: _mean(values) for cell, values in cells.items()}
        finite = {cell: value for cell, value in means.items() if math.isfinite(value)}
        chosen = max(finite, key=finite.__getitem__) if finite else next(iter(means))
        swept = len(cells) > 1 or chosen != method
        choices[method] = {
            "chosen": chosen,
            "val_dice": _mean(every[chosen]) if selection else means[chosen],
            "sweep": means if swept else None,
        }
    return choices


def recommend(choices: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The method with the highest mean validation Dice (None when no run has one)."""
    finite = {m: c["val_dice"] for m, c in choices.items() if math.isfinite(c["val_dice"])}
    return max(finite, key=finite.__getitem__) if finite else None


def _number(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None


def evidence_summary(
    results: list[Mapping[str, Any]],
    *,
    student: str,
    cohort: str,
    seeds: int,
    split_seeds: int,
    replicates: int = DEFAULT_REPLICATES,
    bootstrap_seed: int = DEFAULT_SEED,
    not_run: Sequence[str] = (),
    selection: SweepSelection | None = None,
) -> dict[str, Any]:
    """``summary.json``: per method, its chosen cell's mean test Dice (per case over
    structures, then over cases, seeds and split seeds), its paired difference against
    ``no_kd`` with the 95 % interval, its validation Dice, HD95 and missed structures.
    ``not_run``: the grid's cells left out of this pass (``mtkd ablate --cells``), listed
    under ``"not_run"``: the summary is then partial. ``selection``: the grid's
    ``sweep_selection`` (the runs a sweep's choice is made on)."""
    rows = runs_rows(results)
    choices = choose_sub_cells(results, selection)
    runs_per_cell: dict[str, list[Mapping[str, Any]]] = {}
    for result in results:
        runs_per_cell.setdefault(result["cell"], []).append(result)
    cells: dict[str, Any] = {}
    for method, choice in choices.items():
        chosen = choice["chosen"]
        entry: dict[str, Any] = {
            "dice": _number(stratified_mean(case_means(rows, chosen, "dice"))),
            "hd95": _number(stratified_mean(case_means(rows, chosen, "hd95"))),
            "missed_per_run": _number(
                _mean(
                    [
                        sum(int(c["missed"]) for c in r.get("cases") or [])
                        for r in runs_per_cell[chosen]
                    ]
                )
            ),
            "val_dice": _number(choice["val_dice"]),
            "runs": len(runs_per_cell[chosen]),
        }
        if NO_KD in choices:
            difference = paired_difference(
                rows, chosen, choices[NO_KD]["chosen"], replicates=replicates, seed=bootstrap_seed
            )
            entry["diff_vs_nokd"] = {
                "mean": _number(difference.mean),
                "ci95": [_number(difference.ci95[0]), _number(difference.ci95[1])],
                "pairs": difference.pairs,
            }
        if choice["sweep"] is not None:
            entry["chosen"] = chosen
            entry["sweep_val_dice"] = {cell: _number(v) for cell, v in choice["sweep"].items()}
        cells[method] = entry
    summary: dict[str, Any] = {
        "student": student,
        "cohort": cohort,
        "seeds": seeds,
        "split_seeds": split_seeds,
        "recommended": recommend(choices),
        "selection": SELECTION if selection is None else f"{SELECTION}; {_selected(selection)}",
        "bootstrap": {"scheme": BOOTSTRAP, "replicates": replicates, "seed": bootstrap_seed},
        "cells": cells,
    }
    if not_run:
        summary["not_run"] = list(not_run)
    teacher = [r for r in results if r.get("role") == TEACHER]
    if teacher:
        summary["teacher"] = {"dice": _number(_mean([r.get("dice") for r in teacher]))}
    return summary


def _selected(selection: SweepSelection) -> str:
    return (
        f"a sweep's sub-cells compared on the runs of seeds {list(selection.seeds)} x split "
        f"seeds {list(selection.split_seeds)} only; the chosen sub-cell then ran every seed"
    )


def _text(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def evidence_markdown(summary: Mapping[str, Any]) -> str:
    """The summary as a Markdown table: one row per method, the recommended one in bold."""
    lines = [
        f"# KD evidence: {summary['student']} on {summary['cohort']}",
        "",
        f"{summary['seeds']} seed(s) x {summary['split_seeds']} split seed(s) per cell. Test "
        "Dice: per case, mean over structures, then over cases, seeds and split seeds. "
        f"Difference vs no KD: {summary['bootstrap']['scheme']}, "
        f"{summary['bootstrap']['replicates']} replicates. Selection: {summary['selection']}.",
        "",
        "| cell | chosen on validation | val Dice | test Dice | Δ Dice vs no KD [95 % CI] "
        "| HD95 (mm) | missed / run | runs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, cell in summary["cells"].items():
        difference = cell.get("diff_vs_nokd") or {}
        low, high = difference.get("ci95") or [None, None]
        delta = (
            f"{_text(difference.get('mean'))} [{_text(low)}, {_text(high)}]"
            if difference
            else "n/a"
        )
        shown = f"**{name}** (recommended)" if name == summary["recommended"] else name
        lines.append(
            f"| {shown} | {cell.get('chosen', '–')} | {_text(cell['val_dice'])} | "
            f"{_text(cell['dice'])} | {delta} | {_text(cell['hd95'], 2)} | "
            f"{_text(cell['missed_per_run'], 1)} | {cell['runs']} |"
        )
    if "teacher" in summary:
        lines += ["", f"Teacher test Dice: {_text(summary['teacher']['dice'])}."]
    if summary.get("not_run"):
        lines += [
            "",
            f"PARTIAL: the grid's cells {', '.join(summary['not_run'])} were not run in this "
            "pass (`mtkd ablate --cells`); the recommendation is among the cells above only.",
        ]
    return "\n".join(lines) + "\n"
