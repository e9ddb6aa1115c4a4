"""The ablation configuration: a distillation run config plus an ``ablation:`` section.

The run config (data, split, model, train, ``distill.teacher``) is the recipe every cell shares;
the section spans the cells::

    ablation:
      seeds: [0, 1, 2]                        # train.seed of each run (default 0, 1, 2)
      pairs: [[E-E, B-B, D-D], [B-B], []]     # subsets of the thesis pairs; [] = no feature term
      feature_losses: [infonce, mse]          # any feature loss the engine knows
      output_losses: [pmd, cwd, none]         # any output loss, or none (no output term)
      include: [no_kd, teacher]               # extra rows (default both)
      split_seeds: null                       # or [0, 1]: split.seed of each run (below)
      cells: null                             # or a list of {name, pairs, feature_loss,
                                              #   output_loss, set, sweep} instead of the
                                              #   product above
      sweep_selection: null                   # or {seeds: [0, 1, 2], split_seeds: [0]}:
                                              #   choose each sweep's value on these runs
                                              #   first (below)

A cell is ``preset: thesis`` with the pairs it does not list weighted 0 (``scale_weights``), its
``feature_loss`` and its output loss (weight and temperature from ``distill.output``, else the
thesis' 0.2 and T 4; ``none`` sets the output weight to 0, so the term is logged, not trained).
A cell without pairs and output term is the no-KD student, ``scale: 0`` (the same recipe with
every distillation weight zero), named ``no_kd``. Cells are named ``EBD-infonce-pmd``,
``B-mse-none``, ``pmd-only`` (no pairs), ``no_kd``, unless an explicit cell gives a ``name``.

An explicit cell may also carry ``set``, distill keys (dotted, below ``distill``) with their
values, e.g. ``set: {output.weight: 3, output.temperature: 4}`` (CWD at its published
segmentation settings), and ``sweep``, distill keys with lists of values, e.g.
``sweep: {output.weight: [1, 3, 10]}``: the cell becomes one sub-cell per combination, named
``cwd[output.weight=1]`` (keys in the order given), all trained and scored; the method's
reported row is the sub-cell with the best mean validation Dice (:mod:`mtkd.ablation.evidence`).
A sub-cell whose runs would be exactly those of a cell outside the sweep (the published weight
of a tuned method: ``cwd_tuned[output.weight=3]`` and ``cwd``) is not trained again: its rows
are that cell's runs, trained once in that cell's folders.
With ``sweep_selection`` the sub-cells first run only those seeds x split seeds (a subset of
the grid's); the one with the best mean validation Dice over them is then trained on the other
seeds and split seeds as well, the others are not (:mod:`mtkd.ablation.plan`). The choice is
made as without it, on fewer runs: three values over 10 seeds x 2 split seeds, chosen on 3 x 2,
cost 32 runs instead of 60.
The keys the cell itself sets (``teacher``, ``preset``, ``pairs``, ``feature_loss``,
``output.loss``) cannot be set or swept.

Every cell and seed uses the same data, split and recipe; the seed (``train.seed``) varies the
initialisation, data order and augmentation only. Without ``split_seeds`` every run has the
recipe's ``split.seed`` (the same patients and student subset); with ``split_seeds: [0, 1]``
every cell runs seeds x split seeds, each split seed a different patient split (test cases
included). A teacher trained on one split has seen the other splits' test cases: give
``distill.teacher`` with the placeholder ``{split_seed}`` (e.g. ``runs/teacher-split{split_seed}``)
to use one teacher per split seed, each trained with that ``split.seed``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mtkd.config import (
    DistillConfig,
    OutputTermConfig,
    RunConfig,
    differing_keys,
)
from mtkd.distill.presets import THESIS_PAIRS

FORMAT = 1
PAIR_LABELS = tuple(label for label, _ in THESIS_PAIRS)  # E-E, B-B, D-D
PAIR_BY_LETTER = {label.split("-")[0]: label for label in PAIR_LABELS}  # E -> E-E
NO_KD = "no_kd"
TEACHER = "teacher"
KD = "kd"
NO_OUTPUT = "none"
DEFAULT_SEEDS = [0, 1, 2]
SECTION_KEYS = (
    "seeds",
    "split_seeds",
    "pairs",
    "feature_losses",
    "output_losses",
    "include",
    "cells",
    "sweep_selection",
)
GRID_KEYS = ("pairs", "feature_losses", "output_losses")
CELL_KEYS = ("name", "pairs", "feature_loss", "output_loss", "set", "sweep")
# distill keys a cell's own keys decide (not for ``set`` or ``sweep``)
CELL_OWNED = ("teacher", "preset", "pairs", "feature_loss", "output", "output.loss")
SPLIT_SEED = "{split_seed}"  # in distill.teacher: one teacher per split seed
INCLUDE = (NO_KD, TEACHER)
CELL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class Cell:
    """One row of the grid: which thesis pairs, which feature loss, which output loss."""

    name: str
    pairs: tuple[str, ...] = ()
    feature_loss: str | None = None  # None without pairs
    output_loss: str | None = None  # None: no output term
    # distill keys (dotted) set by the cell or its sweep, in the order given
    settings: tuple[tuple[str, Any], ...] = ()
    method: str = ""  # the cell a sweep expanded into this sub-cell ("": not swept)

    @property
    def family(self) -> str:
        """The method's row: the cell's name, or the swept cell's for a sub-cell."""
        return self.method or self.name

    @property
    def is_no_kd(self) -> bool:
        return not self.pairs and self.output_loss is None

    @property
    def role(self) -> str:
        return NO_KD if self.is_no_kd else KD

    def to_dict(self) -> dict[str, Any]:
        data = {
            "name": self.name,
            "pairs": list(self.pairs),
            "feature_loss": self.feature_loss,
            "output_loss": self.output_loss or NO_OUTPUT,
        }
        if self.settings:  # absent otherwise: grids stored before these keys still match
            data["set"] = dict(self.settings)
        if self.method:
            data["method"] = self.method
        return data


def setting_text(value: Any) -> str:
    """A set/swept value in a sub-cell name: 3, 0.3, 1e-05, train."""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def sub_cell_name(method: str, swept: list[tuple[str, Any]]) -> str:
    """``cwd[output.weight=3,output.temperature=4]``."""
    return f"{method}[{','.join(f'{key}={setting_text(v)}' for key, v in swept)}]"


def _set_key(section: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` (below ``distill``) in ``section``, creating mappings on the way."""
    *parents, last = key.split(".")
    for part in parents:
        child = section.get(part)
        section[part] = child = dict(child) if isinstance(child, dict) else {}
        section = child
    section[last] = value


def cell_name(pairs: tuple[str, ...], feature_loss: str | None, output_loss: str | None) -> str:
    """``EBD-infonce-pmd``, ``B-mse-none``, ``pmd-only``, ``no_kd``."""
    if not pairs:
        return NO_KD if output_loss is None else f"{output_loss}-only"
    letters = "".join(label.split("-")[0] for label in pairs)
    return f"{letters}-{feature_loss}-{output_loss or NO_OUTPUT}"


@dataclass(frozen=True)
class SweepSelection:
    """``ablation.sweep_selection``: the runs (seeds x split seeds) on which each sweep's
    value is chosen before its chosen sub-cell runs the grid's other seeds."""

    seeds: tuple[int, ...]
    split_seeds: tuple[int, ...]

    def covers(self, split_seed: int, seed: int) -> bool:
        """Whether the run (split seed, seed) is one of the selection runs."""
        return split_seed in self.split_seeds and seed in self.seeds

    def to_dict(self) -> dict[str, list[int]]:
        return {"seeds": list(self.seeds), "split_seeds": list(self.split_seeds)}


@dataclass
class Ablation:
    """A resolved grid: the shared recipe, the seeds, the cells and whether the teacher is a
    row of the table."""

    base: RunConfig
    seeds: list[int]
    cells: list[Cell]
    teacher_row: bool = True
    source: Path | None = None
    split_seeds: list[int] | None = None  # None: the recipe's split.seed only
    selection: SweepSelection | None = None  # None: every sub-cell runs every seed
    # sub-cell name -> the cell it repeats (or None), filled by same_runs_as
    _repeats: dict[str, Cell | None] = field(default_factory=dict, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.base.name

    @property
    def splits(self) -> list[int]:
        """The split seeds the runs use (the recipe's ``split.seed`` without split_seeds)."""
        return list(self.split_seeds) if self.split_seeds is not None else [self.base.split.seed]

    def teacher(self, split_seed: int | None = None) -> str:
        """The teacher of the runs with ``split_seed`` (``{split_seed}`` filled in)."""
        split = self.base.split.seed if split_seed is None else split_seed
        return self.base.distill.teacher.replace(SPLIT_SEED, str(split))

    def distill_section(self, cell: Cell, split_seed: int | None = None) -> dict[str, Any]:
        """The ``distill`` section of ``cell``'s runs (its teacher's ``{split_seed}`` left as
        is without ``split_seed``)."""
        base = self.base.distill
        teacher = base.teacher if split_seed is None else self.teacher(split_seed)
        section: dict[str, Any] = {"teacher": teacher, "preset": "thesis"}
        # the recipe's data and contrast settings every distilling cell shares (a cell's
        # ``set`` may still change them); a no-KD run leaves unlabelled images out anyway
        section["unlabelled"] = base.unlabelled
        section["negatives"] = base.negatives
        # any other recipe key no cell decides (teacher_targets, anchor, keys added later),
        # where it differs from the default: absent otherwise, so older grids still match
        section |= _recipe_only_keys(base)
        if cell.is_no_kd:
            section["scale"] = 0.0
            return section
        weights = dict(THESIS_PAIRS) | dict(base.scale_weights or {})
        section["scale"] = base.scale
        section["scale_weights"] = {
            label: float(weights[label]) if label in cell.pairs else 0.0 for label in PAIR_LABELS
        }
        if cell.pairs:
            section["feature_loss"] = cell.feature_loss
        output = base.output or OutputTermConfig()
        section["output"] = {
            "loss": cell.output_loss or output.loss,
            "weight": output.weight if cell.output_loss else 0.0,
            "temperature": output.temperature,
        }
        for key, value in cell.settings:
            _set_key(section, key, value)
        return section

    def same_runs_as(self, cell: Cell) -> Cell | None:
        """For a sub-cell of a sweep, the cell outside any sweep whose runs it would repeat
        exactly (the same ``distill`` section for every split seed, e.g. the published weight
        of ``cwd_tuned`` and the cell ``cwd``); None for any other cell."""
        if not cell.method:
            return None
        if cell.name not in self._repeats:
            mine = [self.distill_section(cell, split) for split in self.splits]
            self._repeats[cell.name] = next(
                (
                    other
                    for other in self.cells
                    if not other.method
                    and mine == [self.distill_section(other, s) for s in self.splits]
                ),
                None,
            )
        return self._repeats[cell.name]

    def run_config(self, cell: Cell, seed: int, split_seed: int | None = None) -> RunConfig:
        """The run config of ``cell`` with ``seed`` (and ``split_seed``: ``split.seed``): the
        recipe, ``train.seed`` and the cell's ``distill`` section."""
        data = self.base.to_dict()
        data["name"] = f"{cell.name}-seed{seed}"
        if self.split_seeds is not None and split_seed is not None:
            data["name"] = f"{cell.name}-split{split_seed}-seed{seed}"
        data["train"]["seed"] = seed
        if split_seed is not None:
            data["split"]["seed"] = split_seed
        data["distill"] = self.distill_section(
            cell, self.base.split.seed if split_seed is None else split_seed
        )
        return RunConfig.from_dict(data, source=self.source)

    def recipe(self) -> dict[str, Any]:
        """What every run shares: the base config less its name, ``distill`` and seed."""
        recipe = self.base.to_dict()
        for key in ("name", "distill"):
            recipe.pop(key)
        recipe["train"].pop("seed")
        if self.split_seeds is not None:
            recipe["split"].pop("seed")
        return recipe

    def to_dict(self) -> dict[str, Any]:
        """The resolved grid, as written to ``ABL/ablation.yaml``."""
        grid = {
            "format": FORMAT,
            "name": self.name,
            "teacher": self.base.distill.teacher,
            "seeds": list(self.seeds),
            "teacher_row": self.teacher_row,
            "cells": [
                {**cell.to_dict(), "role": cell.role, "distill": self.distill_section(cell)}
                for cell in self.cells
            ],
            "recipe": self.recipe(),
        }
        if self.split_seeds is not None:  # absent otherwise: older grids still match
            grid["split_seeds"] = list(self.split_seeds)
        if self.selection is not None:
            grid["sweep_selection"] = self.selection.to_dict()
        return grid


def _recipe_only_keys(distill: DistillConfig) -> dict[str, Any]:
    """The keys of the recipe's ``distill`` section that no cell decides and ``distill_section``
    does not write otherwise, where they differ from the default (plain values)."""
    decided = {*CELL_OWNED, "scale", "scale_weights", "unlabelled", "negatives"}
    given, default = asdict(distill), asdict(DistillConfig())
    return {
        key: value for key, value in given.items() if key not in decided and value != default[key]
    }


def grid_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys in which two resolved grids differ, cells compared by name: a grid may gain or
    drop cells, but a cell in both must be the same (``cells.<name>.<key>``);
    ``recipe.train.device`` is not compared (a grid may continue on another device), nor
    ``sweep_selection`` (a sweep's choice is then made on the runs it names now)."""

    def shared(grid: dict[str, Any]) -> dict[str, Any]:
        grid = {k: v for k, v in grid.items() if k not in ("cells", "sweep_selection")}
        recipe = dict(grid.get("recipe") or {})
        recipe["train"] = {k: v for k, v in (recipe.get("train") or {}).items() if k != "device"}
        grid["recipe"] = recipe
        return grid

    differences = differing_keys(shared(stored), shared(current))
    stored_cells = {cell.get("name"): cell for cell in _cell_list(stored)}
    for cell in _cell_list(current):
        before = stored_cells.get(cell.get("name"))
        if before is not None:
            differences += differing_keys(before, cell, f"cells.{cell.get('name')}.")
    return differences


def _cell_list(grid: dict[str, Any]) -> list[dict[str, Any]]:
    cells = grid.get("cells")
    return [cell for cell in cells if isinstance(cell, dict)] if isinstance(cells, list) else []
