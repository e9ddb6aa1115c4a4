"""Which runs of a grid are trained, in which order.

Without ``ablation.sweep_selection`` every cell runs every split seed x seed, in one pass.
With it, the first pass runs every cell that is not a sub-cell of a sweep in full and each
sub-cell on the selection runs only; the second pass, once every sub-cell of a method has all
its selection runs scored, runs the other seeds and split seeds of the sub-cell chosen on their
validation Dice (:func:`mtkd.ablation.evidence.choose_sub_cells`, test scores unused).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mtkd.ablation.evidence import choose_sub_cells
from mtkd.ablation.grid import Ablation, Cell

__all__ = ["Run", "first_pass", "planned_runs", "second_pass", "swept_methods", "trained_as"]

Run = tuple[Cell, int, int]  # the cell, its split seed and its seed


def trained_as(ablation: Ablation, cell: Cell) -> Cell:
    """The cell whose folders hold ``cell``'s runs: itself, or the cell outside the sweep
    that a sub-cell repeats exactly (:meth:`~mtkd.ablation.grid.Ablation.same_runs_as`)."""
    return ablation.same_runs_as(cell) or cell


def _runs(ablation: Ablation, cell: Cell, selection_only: bool) -> list[Run]:
    return [
        (cell, split, seed)
        for split in ablation.splits
        for seed in ablation.seeds
        if not selection_only or ablation.selection.covers(split, seed)
    ]


def _selected(ablation: Ablation, cell: Cell) -> bool:
    """Whether ``cell`` runs the selection runs only in the first pass."""
    return ablation.selection is not None and bool(cell.method)


def first_pass(ablation: Ablation, cells: Sequence[Cell]) -> list[Run]:
    """Every run of ``cells``, a swept method's sub-cells on the selection runs only."""
    return [run for cell in cells for run in _runs(ablation, cell, _selected(ablation, cell))]


def second_pass(
    ablation: Ablation, cells: Sequence[Cell], results: Sequence[Mapping[str, Any]]
) -> list[Run]:
    """The runs beyond the selection of each swept method's chosen sub-cell, for the methods
    of ``cells`` whose sub-cells (all of them in ``cells``) have every selection run among
    ``results``; [] without a sweep selection."""
    if ablation.selection is None:
        return []
    done = {(r["cell"], r["split_seed"], r["seed"]) for r in results}
    runs: list[Run] = []
    for method, subs in swept_methods(ablation, cells).items():
        needed = [run for cell in subs for run in _runs(ablation, cell, True)]
        if any((cell.name, split, seed) not in done for cell, split, seed in needed):
            continue
        mine = [r for r in results if r["cell"] in {cell.name for cell in subs}]
        chosen = choose_sub_cells(mine, ablation.selection)[method]["chosen"]
        cell = next(cell for cell in subs if cell.name == chosen)
        runs += [run for run in _runs(ablation, cell, False) if run not in needed]
    return runs


def swept_methods(ablation: Ablation, cells: Sequence[Cell]) -> dict[str, list[Cell]]:
    """Each swept method whose sub-cells are all in ``cells`` -> its sub-cells."""
    methods: dict[str, list[Cell]] = {}
    for method in dict.fromkeys(cell.method for cell in cells if cell.method):
        subs = [cell for cell in ablation.cells if cell.method == method]
        if all(cell in cells for cell in subs):
            methods[method] = subs
    return methods


def planned_runs(ablation: Ablation, cells: Sequence[Cell]) -> int:
    """How many runs both passes score for ``cells``, a sub-cell's runs that repeat another
    cell's included (the second pass's count is known before its choice: one sub-cell per
    method)."""
    total = len(first_pass(ablation, cells))
    if ablation.selection is not None:
        methods = swept_methods(ablation, cells)
        every = len(ablation.splits) * len(ablation.seeds)
        selected = len(ablation.selection.seeds) * len(ablation.selection.split_seeds)
        total += len(methods) * (every - selected)
    return total
