"""The ablation configuration: a distillation run config plus an ``ablation:`` section.

The run config (data, split, model, train, ``distill.teacher``) is the recipe every cell shares;
the section spans the cells::

    ablation:
      seeds: [0, 1, 2]                        # train.seed of each run (default 0, 1, 2)
      pairs: [[E-E, B-B, D-D], [B-B], []]     # subsets of the thesis pairs; [] = no feature term
      feature_losses: [infonce, mse]          # any feature loss the engine knows
      output_losses: [pmd, cwd, none]         # any output loss, or none (no output term)
      include: [no_kd, teacher]               # extra rows (default both)
      cells: null                             # or a list of {name, pairs, feature_loss,
                                              #   output_loss} instead of the product above

A cell is ``preset: thesis`` with the pairs it does not list weighted 0 (``scale_weights``), its
``feature_loss`` and its output loss (weight and temperature from ``distill.output``, else the
thesis' 0.2 and T 4; ``none`` sets the output weight to 0, so the term is logged, not trained).
A cell without pairs and output term is the no-KD student, ``scale: 0`` (the same recipe with
every distillation weight zero), named ``no_kd``. Cells are named ``EBD-infonce-pmd``,
``B-mse-none``, ``pmd-only`` (no pairs), ``no_kd``.

Every cell and seed uses the same data, split (``split.seed`` stays fixed, so all runs see the
same patients and the same student subset) and recipe; the seed (``train.seed``) varies the
initialisation, data order and augmentation only.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtkd.config import (
    OutputTermConfig,
    RunConfig,
    differing_keys,
    read_yaml,
    resolve_file_paths,
)
from mtkd.distill.losses import get_output_loss
from mtkd.engine.terms import THESIS_PAIRS, feature_weights
from mtkd.errors import MTKDError

FORMAT = 1
PAIR_LABELS = tuple(label for label, _ in THESIS_PAIRS)  # E-E, B-B, D-D
_SHORT = {label.split("-")[0]: label for label in PAIR_LABELS}  # E -> E-E
NO_KD = "no_kd"
TEACHER = "teacher"
KD = "kd"
NO_OUTPUT = "none"
DEFAULT_SEEDS = [0, 1, 2]
SECTION_KEYS = ("seeds", "pairs", "feature_losses", "output_losses", "include", "cells")
GRID_KEYS = ("pairs", "feature_losses", "output_losses")
CELL_KEYS = ("name", "pairs", "feature_loss", "output_loss")
INCLUDE = (NO_KD, TEACHER)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class Cell:
    """One row of the grid: which thesis pairs, which feature loss, which output loss."""

    name: str
    pairs: tuple[str, ...] = ()
    feature_loss: str | None = None  # None without pairs
    output_loss: str | None = None  # None: no output term

    @property
    def is_no_kd(self) -> bool:
        return not self.pairs and self.output_loss is None

    @property
    def role(self) -> str:
        return NO_KD if self.is_no_kd else KD

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pairs": list(self.pairs),
            "feature_loss": self.feature_loss,
            "output_loss": self.output_loss or NO_OUTPUT,
        }


def cell_name(pairs: tuple[str, ...], feature_loss: str | None, output_loss: str | None) -> str:
    """``EBD-infonce-pmd``, ``B-mse-none``, ``pmd-only``, ``no_kd``."""
    if not pairs:
        return NO_KD if output_loss is None else f"{output_loss}-only"
    letters = "".join(label.split("-")[0] for label in pairs)
    return f"{letters}-{feature_loss}-{output_loss or NO_OUTPUT}"


@dataclass
class Ablation:
    """A resolved grid: the shared recipe, the seeds, the cells and whether the teacher is a
    row of the table."""

    base: RunConfig
    seeds: list[int]
    cells: list[Cell]
    teacher_row: bool = True
    source: Path | None = None

    @property
    def name(self) -> str:
        return self.base.name

    def distill_section(self, cell: Cell) -> dict[str, Any]:
        """The ``distill`` section of ``cell``'s runs."""
        base = self.base.distill
        section: dict[str, Any] = {"teacher": base.teacher, "preset": "thesis"}
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
        return section

    def run_config(self, cell: Cell, seed: int) -> RunConfig:
        """The run config of ``cell`` with ``seed``: the recipe, ``train.seed`` and the cell's
        ``distill`` section."""
        data = self.base.to_dict()
        data["name"] = f"{cell.name}-seed{seed}"
        data["train"]["seed"] = seed
        data["distill"] = self.distill_section(cell)
        return RunConfig.from_dict(data, source=self.source)

    def recipe(self) -> dict[str, Any]:
        """What every run shares: the base config less its name, ``distill`` and seed."""
        recipe = self.base.to_dict()
        for key in ("name", "distill"):
            recipe.pop(key)
        recipe["train"].pop("seed")
        return recipe

    def to_dict(self) -> dict[str, Any]:
        """The resolved grid, as written to ``ABL/ablation.yaml``."""
        return {
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


def grid_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys in which two resolved grids differ (``recipe.train.device`` is not compared: a grid
    may continue on another device)."""

    def without_device(grid: dict[str, Any]) -> dict[str, Any]:
        grid = dict(grid)
        recipe = dict(grid.get("recipe") or {})
        recipe["train"] = {k: v for k, v in (recipe.get("train") or {}).items() if k != "device"}
        grid["recipe"] = recipe
        return grid

    return differing_keys(without_device(stored), without_device(current))


def load_ablation(
    path: str | Path, *, seeds: list[int] | None = None, device: str | None = None
) -> Ablation:
    """Read an ablation config (YAML); errors name the key and the file. ``seeds`` replaces
    ``ablation.seeds``, ``device`` the recipe's ``train.device``."""
    data = read_yaml(path)
    if isinstance(data, dict):  # relative paths are read from the file's folder
        data, _ = resolve_file_paths(data, path)
    return ablation_from_dict(data, source=Path(path), seeds=seeds, device=device)


def ablation_from_dict(
    data: Any,
    source: str | Path | None = None,
    *,
    seeds: list[int] | None = None,
    device: str | None = None,
) -> Ablation:
    """An :class:`Ablation` from a mapping (a run config with an ``ablation`` section)."""
    if not isinstance(data, dict):
        raise MTKDError("a configuration must be a mapping of keys to values", path=source)
    data = dict(data)
    if "ablation" not in data:
        raise MTKDError(
            "an ablation config is a distillation run config with an 'ablation:' section "
            f"({', '.join(SECTION_KEYS)}); this one has none",
            path=source,
        )
    section = data.pop("ablation")
    base = RunConfig.from_dict(data, source=source)
    if device:
        base.train.device = device
    reader = _Reader(source)
    reader.check_base(base)
    if not isinstance(section, dict):
        reader.fail("ablation", f"must be a mapping of {', '.join(SECTION_KEYS)}")
    unknown = sorted(set(section) - set(SECTION_KEYS))
    if unknown:
        raise MTKDError(
            f"unknown config key(s) {', '.join(map(str, unknown))} in 'ablation'; "
            f"known: {', '.join(SECTION_KEYS)}",
            path=source,
        )
    chosen = reader.seeds(section.get("seeds", DEFAULT_SEEDS), "ablation.seeds")
    if seeds is not None:
        chosen = reader.seeds(list(seeds), "--seeds")
    include = reader.include(section.get("include", list(INCLUDE)))
    if section.get("cells") is not None:
        clash = [key for key in GRID_KEYS if key in section]
        if clash:
            reader.fail(
                f"ablation.{clash[0]}",
                "give either ablation.cells or the grid keys (pairs, feature_losses, "
                "output_losses), not both",
            )
        cells = reader.explicit_cells(section["cells"])
    else:
        cells = reader.product(section)
    if NO_KD in include and not any(cell.is_no_kd for cell in cells):
        cells.append(Cell(NO_KD))
    cells = [c for c in cells if c.is_no_kd] + [c for c in cells if not c.is_no_kd]
    if not cells:
        reader.fail("ablation", "the grid has no cells")
    ablation = Ablation(base, chosen, cells, TEACHER in include, Path(source) if source else None)
    reader.check_cells(ablation, explicit=section.get("cells") is not None)
    return ablation


class _Reader:
    """Validation of the ``ablation`` section; every error names its key and the file."""

    def __init__(self, source: str | Path | None):
        self.source = source

    def fail(self, key: str, problem: str) -> None:
        raise MTKDError(f"config key '{key}': {problem}", path=self.source)

    def check_base(self, base: RunConfig) -> None:
        if base.kind != "distill":
            self.fail("kind", "an ablation trains students from distill.teacher: use 'distill'")
        distill = base.distill
        if distill.pairs:
            self.fail(
                "distill.pairs",
                "an ablation varies the thesis pairs (E-E, B-B, D-D); leave explicit pairs out "
                "(preset thesis)",
            )
        if distill.preset not in (None, "thesis"):
            self.fail("distill.preset", "an ablation varies the thesis pairs: use 'thesis'")
        if distill.feature_loss is not None:
            self.fail("distill.feature_loss", "each cell sets it (ablation.feature_losses)")
        if distill.scale == 0:
            self.fail("distill.scale", "0 would make every cell the no-KD student")
        for label, weight in (distill.scale_weights or {}).items():
            if label not in PAIR_LABELS:
                self.fail(
                    f"distill.scale_weights.{label}",
                    f"not a thesis pair; choose from {', '.join(PAIR_LABELS)}",
                )
            if weight == 0:
                self.fail(
                    f"distill.scale_weights.{label}",
                    "0 drops the pair from every cell; leave cells out with ablation.pairs",
                )
        fixed = base.split.fixed
        if fixed is not None and not fixed.get("test"):
            self.fail("split.fixed.test", "the ablation scores every run on the test cases")
        if fixed is None and base.split.test_fraction <= 0:
            self.fail("split.test_fraction", "the ablation scores every run on test cases: > 0")

    def seeds(self, value: Any, key: str) -> list[int]:
        if not isinstance(value, list) or not value:
            self.fail(key, "must be a non-empty list of integer seeds")
        for index, seed in enumerate(value):
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                self.fail(f"{key}[{index}]", f"must be an integer >= 0, got {seed!r}")
        if len(set(value)) != len(value):
            self.fail(key, f"repeats a seed: {value}")
        return list(value)

    def include(self, value: Any) -> list[str]:
        if not isinstance(value, list):
            self.fail("ablation.include", f"must be a list of {', '.join(INCLUDE)}")
        for index, item in enumerate(value):
            if item not in INCLUDE:
                self.fail(
                    f"ablation.include[{index}]",
                    f"is {item!r}; choose from {', '.join(INCLUDE)}",
                )
        return list(value)

    def pairs(self, value: Any, key: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            self.fail(key, f"must be a list of pair labels ({', '.join(PAIR_LABELS)}) or []")
        labels = []
        for index, item in enumerate(value):
            label = _SHORT.get(item, item) if isinstance(item, str) else item
            if label not in PAIR_LABELS:
                self.fail(
                    f"{key}[{index}]",
                    f"{item!r} is not a thesis pair; choose from {', '.join(PAIR_LABELS)}",
                )
            if label in labels:
                self.fail(key, f"names {label} twice")
            labels.append(label)
        return tuple(label for label in PAIR_LABELS if label in labels)

    def names(self, value: Any, key: str, allow_none: bool) -> list[str | None]:
        if not isinstance(value, list) or not value:
            self.fail(key, "must be a non-empty list of loss names")
        names: list[str | None] = []
        for index, item in enumerate(value):
            if not isinstance(item, str) or not item:
                self.fail(f"{key}[{index}]", f"must be a loss name, got {item!r}")
            name = None if allow_none and item == NO_OUTPUT else item
            if name in names:
                self.fail(key, f"names {item} twice")
            names.append(name)
        return names

    def product(self, section: dict[str, Any]) -> list[Cell]:
        given = section.get("pairs", [list(PAIR_LABELS)])
        if not isinstance(given, list) or not given:
            self.fail("ablation.pairs", "must be a non-empty list of pair lists, e.g. [[B-B], []]")
        pair_sets = [self.pairs(item, f"ablation.pairs[{i}]") for i, item in enumerate(given)]
        features = self.names(
            section.get("feature_losses", ["infonce"]), "ablation.feature_losses", False
        )
        outputs = self.names(section.get("output_losses", ["pmd"]), "ablation.output_losses", True)
        cells: dict[str, Cell] = {}
        for pairs, feature, output in itertools.product(pair_sets, features, outputs):
            feature = feature if pairs else None
            name = cell_name(pairs, feature, output)
            cells.setdefault(name, Cell(name, pairs, feature, output))
        return list(cells.values())

    def explicit_cells(self, value: Any) -> list[Cell]:
        if not isinstance(value, list) or not value:
            self.fail("ablation.cells", f"must be a non-empty list of {{{', '.join(CELL_KEYS)}}}")
        cells: list[Cell] = []
        for index, item in enumerate(value):
            key = f"ablation.cells[{index}]"
            if not isinstance(item, dict):
                self.fail(key, f"must be a mapping of {', '.join(CELL_KEYS)}")
            unknown = sorted(set(item) - set(CELL_KEYS))
            if unknown:
                self.fail(
                    key,
                    f"unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(CELL_KEYS)}",
                )
            pairs = self.pairs(item.get("pairs", list(PAIR_LABELS)), f"{key}.pairs")
            feature = self.names(
                [item.get("feature_loss", "infonce")], f"{key}.feature_loss", False
            )[0]
            output = self.names([item.get("output_loss", "pmd")], f"{key}.output_loss", True)[0]
            feature = feature if pairs else None
            automatic = cell_name(pairs, feature, output)
            name = item.get("name") or automatic
            if not isinstance(name, str) or not _NAME.match(name):
                self.fail(
                    f"{key}.name",
                    f"{name!r} must be letters, digits and _ . + - (a folder name)",
                )
            if name == TEACHER:
                self.fail(f"{key}.name", "'teacher' is the teacher's row")
            if (name == NO_KD) != (automatic == NO_KD):
                self.fail(
                    f"{key}.name",
                    "no_kd is the cell without pairs and without output term, and that cell "
                    "is named no_kd",
                )
            if any(cell.name == name for cell in cells):
                self.fail(f"{key}.name", f"{name!r} names two cells")
            cells.append(Cell(name, pairs, feature, output))
        return cells

    def check_cells(self, ablation: Ablation, explicit: bool) -> None:
        """Build every cell's run config once, and check its loss names with the engine (which
        knows every registered loss)."""
        for cell in ablation.cells:
            config = ablation.run_config(cell, ablation.seeds[0])
            what = "feature_losses"
            try:
                feature_weights(config.distill)
                what = "output_losses"
                if cell.output_loss is not None:
                    get_output_loss(cell.output_loss)
            except MTKDError as error:
                key = "ablation.cells" if explicit else f"ablation.{what}"
                self.fail(key, f"cell {cell.name}: {error.problem}")
