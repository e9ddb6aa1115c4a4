"""Reading an ablation config (YAML, or a mapping) into an :class:`~mtkd.ablation.grid.Ablation`;
every error names its key and the file. The section's keys are described in
:mod:`mtkd.ablation.grid`."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from mtkd.ablation.grid import (
    CELL_KEYS,
    CELL_NAME_PATTERN,
    CELL_OWNED,
    DEFAULT_SEEDS,
    GRID_KEYS,
    INCLUDE,
    NO_KD,
    NO_OUTPUT,
    PAIR_BY_LETTER,
    PAIR_LABELS,
    SECTION_KEYS,
    TEACHER,
    Ablation,
    Cell,
    SweepSelection,
    cell_name,
    setting_text,
    sub_cell_name,
)
from mtkd.config import RunConfig, read_yaml, resolve_file_paths
from mtkd.distill.losses import get_output_loss
from mtkd.distill.presets import feature_weights
from mtkd.errors import MTKDError

__all__ = ["ablation_from_dict", "load_ablation"]


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
    ablation.selection = reader.selection(section.get("sweep_selection"), ablation)
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

    def selection(self, value: Any, ablation: Ablation) -> SweepSelection | None:
        """``ablation.sweep_selection``: seeds (and split seeds, default all) of the grid's."""
        key = "ablation.sweep_selection"
        if value is None:
            return None
        if not isinstance(value, dict) or "seeds" not in value:
            self.fail(
                key,
                "must be a mapping {seeds: [...], split_seeds: [...]} (split_seeds "
                "optional: all of the grid's)",
            )
        unknown = sorted(set(value) - {"seeds", "split_seeds"})
        if unknown:
            self.fail(
                key, f"unknown key(s) {', '.join(map(str, unknown))}; known: seeds, split_seeds"
            )
        runs = {}
        for name, grid in (("seeds", ablation.seeds), ("split_seeds", ablation.splits)):
            given = self.seeds(value.get(name, list(grid)), f"{key}.{name}")
            outside = [seed for seed in given if seed not in grid]
            if outside:
                self.fail(
                    f"{key}.{name}",
                    f"{outside} not among the grid's {name.replace('_', ' ')} {list(grid)}",
                )
            runs[name] = tuple(given)
        if not any(cell.method for cell in ablation.cells):
            self.fail(key, "the grid has no sweep to choose on these runs")
        return SweepSelection(runs["seeds"], runs["split_seeds"])

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
            label = PAIR_BY_LETTER.get(item, item) if isinstance(item, str) else item
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
            if not isinstance(name, str) or not CELL_NAME_PATTERN.match(name):
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
