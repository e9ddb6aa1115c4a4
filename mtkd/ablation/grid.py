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
from mtkd.distill.presets import THESIS_PAIRS, feature_weights
from mtkd.errors import MTKDError

FORMAT = 1
PAIR_LABELS = tuple(label for label, _ in THESIS_PAIRS)  # E-E, B-B, D-D
_SHORT = {label.split("-")[0]: label for label in PAIR_LABELS}  # E -> E-E
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
)
GRID_KEYS = ("pairs", "feature_losses", "output_losses")
CELL_KEYS = ("name", "pairs", "feature_loss", "output_loss", "set", "sweep")
# distill keys a cell's own keys decide (not for ``set`` or ``sweep``)
CELL_OWNED = ("teacher", "preset", "pairs", "feature_loss", "output", "output.loss")
SPLIT_SEED = "{split_seed}"  # in distill.teacher: one teacher per split seed
INCLUDE = (NO_KD, TEACHER)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


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
        return grid


def grid_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys in which two resolved grids differ, cells compared by name: a grid may gain or
    drop cells, but a cell in both must be the same (``cells.<name>.<key>``);
    ``recipe.train.device`` is not compared (a grid may continue on another device)."""

    def shared(grid: dict[str, Any]) -> dict[str, Any]:
        grid = {key: value for key, value in grid.items() if key != "cells"}
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


def load_ablation(
    path: str | Path,
    *,
    seeds: list[int] | None = None,
    device: str | None = None,
    data_source: str | Path | None = None,
    teacher: str | Path | None = None,
) -> Ablation:
    """Read an ablation config (YAML); errors name the key and the file. ``seeds`` replaces
    ``ablation.seeds``, ``device`` the recipe's ``train.device``, ``data_source`` its
    ``data.source`` and ``teacher`` its ``distill.teacher`` (``{split_seed}`` kept; both
    relative to the working directory)."""
    data = read_yaml(path)
    if isinstance(data, dict):  # relative paths are read from the file's folder
        data, _ = resolve_file_paths(data, path)
        for key, value in (("data.source", data_source), ("distill.teacher", teacher)):
            if value is not None:
                section, name = key.split(".")
                given = data.get(section)
                given = given if isinstance(given, dict) else {}
                data[section] = {**given, name: str(Path(value).expanduser().absolute())}
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
    distill = data.get("distill")
    if isinstance(distill, dict) and not {"preset", "pairs", "output"} & set(distill):
        # the cells set the terms: the base names the thesis pairs they vary, not the
        # recommended recipe a run naming no terms would get
        data["distill"] = {**distill, "preset": "thesis"}
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
    split_seeds = section.get("split_seeds")
    if split_seeds is not None:
        split_seeds = reader.seeds(split_seeds, "ablation.split_seeds")
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
    ablation = Ablation(
        base, chosen, cells, TEACHER in include, Path(source) if source else None, split_seeds
    )
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
            if any(cell.family == name for cell in cells):
                self.fail(f"{key}.name", f"{name!r} names two cells")
            settings = self.settings(item.get("set", {}), f"{key}.set", output)
            sweep = self.sweep(item.get("sweep"), f"{key}.sweep", output, settings)
            if (settings or sweep) and automatic == NO_KD:
                self.fail(key, "the no_kd cell has no distillation term to set or sweep")
            if not sweep:
                cells.append(Cell(name, pairs, feature, output, tuple(settings)))
                continue
            keys = [k for k, _ in sweep]
            for values in itertools.product(*(v for _, v in sweep)):
                swept = list(zip(keys, values))
                cells.append(
                    Cell(
                        sub_cell_name(name, swept),
                        pairs,
                        feature,
                        output,
                        tuple(settings + swept),
                        method=name,
                    )
                )
        return cells

    def setting_key(self, name: Any, key: str, output: str | None) -> str:
        if not isinstance(name, str) or not name or name.startswith(".") or name.endswith("."):
            self.fail(key, f"{name!r} is not a distill key (dotted, e.g. output.weight)")
        if name in CELL_OWNED or name.split(".")[0] in ("teacher", "preset", "pairs"):
            self.fail(
                f"{key}.{name}",
                "the cell's own keys (pairs, feature_loss, output_loss) decide it",
            )
        if output is None and name.startswith("output."):
            self.fail(f"{key}.{name}", "the cell has no output term (output_loss: none)")
        return name

    def settings(self, value: Any, key: str, output: str | None) -> list[tuple[str, Any]]:
        if not isinstance(value, dict):
            self.fail(key, "must be a mapping of distill keys to values, e.g. {output.weight: 3}")
        return [(self.setting_key(name, key, output), v) for name, v in value.items()]

    def sweep(
        self, value: Any, key: str, output: str | None, settings: list[tuple[str, Any]]
    ) -> list[tuple[str, list[Any]]]:
        if value is None:
            return []
        if not isinstance(value, dict) or not value:
            self.fail(
                key,
                "must be a mapping of distill keys to lists of values, e.g. "
                "{output.weight: [1, 3]}",
            )
        sweep = []
        for name, values in value.items():
            name = self.setting_key(name, key, output)
            if any(name == fixed for fixed, _ in settings):
                self.fail(f"{key}.{name}", "is also in the cell's 'set'")
            if not isinstance(values, list) or not values:
                self.fail(f"{key}.{name}", "must be a non-empty list of values")
            if any(isinstance(v, (dict, list)) for v in values):
                self.fail(f"{key}.{name}", "values must be numbers or words")
            if len({setting_text(v) for v in values}) != len(values):
                self.fail(f"{key}.{name}", f"repeats a value: {values}")
            sweep.append((name, list(values)))
        return sweep

    def check_cells(self, ablation: Ablation, explicit: bool) -> None:
        """Build every cell's run config once, and check its loss names with the engine (which
        knows every registered loss)."""
        for cell in ablation.cells:
            try:
                config = ablation.run_config(cell, ablation.seeds[0], ablation.splits[0])
            except MTKDError as error:
                if not cell.settings:
                    raise
                self.fail(f"ablation.cells ({cell.name})", error.problem)
            what = "feature_losses"
            try:
                feature_weights(config.distill)
                what = "output_losses"
                if cell.output_loss is not None:
                    get_output_loss(cell.output_loss)
            except MTKDError as error:
                key = "ablation.cells" if explicit else f"ablation.{what}"
                self.fail(key, f"cell {cell.name}: {error.problem}")
