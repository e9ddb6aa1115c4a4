"""``ablation.sweep_selection``: a sweep's value chosen on a few runs on validation Dice, then
only the chosen sub-cell trained on the grid's other seeds (the plan, the choice, the
configuration errors and a tiny grid end to end)."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from conftest import ablation_config
from helpers import expect_error

from mtkd.ablation.evidence import choose_sub_cells
from mtkd.ablation.grid_config import ablation_from_dict, load_ablation
from mtkd.ablation.plan import first_pass, planned_runs, second_pass, trained_as
from mtkd.ablation.run import run_ablation

SWEPT = {"name": "pmd", "pairs": [], "output_loss": "pmd", "sweep": {"output.weight": [0.5, 2]}}
LOW, HIGH = "pmd[output.weight=0.5]", "pmd[output.weight=2]"


def section(**selection) -> dict:
    grid = {"seeds": [0, 1, 2], "split_seeds": [0, 1], "include": ["no_kd"], "cells": [SWEPT]}
    if selection:
        grid["sweep_selection"] = selection
    return grid


def result(cell: str, split: int, seed: int, val_dice: float) -> dict:
    """A run's result record as :func:`mtkd.ablation.results.run_result` writes it (the keys
    the choice reads)."""
    method = "pmd" if cell.startswith("pmd[") else cell
    return {"cell": cell, "method": method, "split_seed": split, "seed": seed, "val_dice": val_dice}


def test_the_sub_cells_run_the_selection_first_then_the_chosen_one_the_rest(
    slab_dataset, teacher_run
):
    ablation = ablation_from_dict(
        ablation_config(slab_dataset, teacher_run, section(seeds=[0, 1], split_seeds=[0]))
    )
    first = [(cell.name, split, seed) for cell, split, seed in first_pass(ablation, ablation.cells)]
    no_kd = [("no_kd", split, seed) for split in (0, 1) for seed in (0, 1, 2)]
    assert first == no_kd + [(LOW, 0, 0), (LOW, 0, 1), (HIGH, 0, 0), (HIGH, 0, 1)]
    assert planned_runs(ablation, ablation.cells) == 6 + 4 + 4  # the chosen one's 4 others
    results = [result(*run, val_dice=0.5) for run in no_kd]
    # the high weight wins on the selection runs; its run outside them (worse) does not count
    results += [result(LOW, 0, 0, 0.6), result(LOW, 0, 1, 0.6)]
    assert second_pass(ablation, ablation.cells, results) == []  # HIGH's selection not done
    results += [result(HIGH, 0, 0, 0.7), result(HIGH, 0, 1, 0.65), result(HIGH, 1, 0, 0.1)]
    second = second_pass(ablation, ablation.cells, results)
    assert [(cell.name, split, seed) for cell, split, seed in second] == [
        (HIGH, 0, 2),
        (HIGH, 1, 0),
        (HIGH, 1, 1),
        (HIGH, 1, 2),
    ]
    choice = choose_sub_cells(results, ablation.selection)["pmd"]
    assert choice["sweep"] == {LOW: pytest.approx(0.6), HIGH: pytest.approx(0.675)}
    # the method's validation Dice: its chosen sub-cell over all its runs, not the selection's
    assert choice["val_dice"] == pytest.approx((0.7 + 0.65 + 0.1) / 3)
    assert choose_sub_cells(results)["pmd"]["sweep"][HIGH] == pytest.approx(0.4833333)
    # a method only partly selected (--cells naming one sub-cell) gets no second pass
    only_low = [cell for cell in ablation.cells if cell.name != HIGH]
    assert second_pass(ablation, only_low, results) == []
    assert planned_runs(ablation, only_low) == 6 + 2


def test_without_a_selection_every_sub_cell_runs_every_seed_in_one_pass(slab_dataset, teacher_run):
    ablation = ablation_from_dict(ablation_config(slab_dataset, teacher_run, section()))
    assert len(first_pass(ablation, ablation.cells)) == 3 * 6
    assert planned_runs(ablation, ablation.cells) == 18
    assert second_pass(ablation, ablation.cells, []) == []
    assert "sweep_selection" not in ablation.to_dict()


@pytest.mark.parametrize(
    ("selection", "words"),
    [
        ({"seeds": [3]}, ("'ablation.sweep_selection.seeds'", "[3] not among")),
        ({"seeds": [0], "split_seeds": [2]}, ("'ablation.sweep_selection.split_seeds'",)),
        ({"seeds": [0], "splits": [0]}, ("'ablation.sweep_selection'", "splits")),
        ({"split_seeds": [0]}, ("'ablation.sweep_selection'", "{seeds: [...]")),
        ({"seeds": []}, ("'ablation.sweep_selection.seeds'", "non-empty")),
    ],
)
def test_selection_errors_name_the_key(slab_dataset, teacher_run, tmp_path, selection, words):
    path = tmp_path / "grid.yaml"
    config = ablation_config(slab_dataset, teacher_run, section(**selection))
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with expect_error(path, *words):
        load_ablation(path)


def test_a_selection_needs_a_sweep(slab_dataset, teacher_run, tmp_path):
    grid = section(seeds=[0])
    grid["cells"] = [{"name": "pmd", "pairs": [], "output_loss": "pmd"}]
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(ablation_config(slab_dataset, teacher_run, grid)))
    with expect_error(path, "'ablation.sweep_selection'", "no sweep"):
        load_ablation(path)


def test_a_sub_cell_that_repeats_a_cell_has_its_runs(slab_dataset, teacher_run):
    """The sweep's value equal to a plain cell's setting: that cell's runs, not new ones."""
    plain = {"name": "pmd_low", "pairs": [], "output_loss": "pmd", "set": {"output.weight": 0.5}}
    grid = section(seeds=[0])
    grid["cells"] = [plain, SWEPT]
    ablation = ablation_from_dict(ablation_config(slab_dataset, teacher_run, grid))
    by_name = {cell.name: cell for cell in ablation.cells}
    assert trained_as(ablation, by_name[LOW]) is by_name["pmd_low"]
    assert trained_as(ablation, by_name[HIGH]) is by_name[HIGH]
    assert trained_as(ablation, by_name["pmd_low"]) is by_name["pmd_low"]  # not a sub-cell
    assert ablation.same_runs_as(by_name["no_kd"]) is None


@pytest.mark.slow
@pytest.mark.parametrize("jobs", [1, 2])
def test_a_grid_with_a_selection_trains_the_chosen_sub_cell_only_on_the_other_seeds(
    slab_dataset, teacher_run, tmp_path, jobs
):
    """Seeds 0 and 1, the sweep chosen on seed 0; its low value repeats the cell pmd_low (with
    two jobs too: that run is trained once)."""
    plain = {"name": "pmd_low", "pairs": [], "output_loss": "pmd", "set": {"output.weight": 0.5}}
    grid = {"seeds": [0, 1], "include": [], "cells": [plain, SWEPT]}
    grid["sweep_selection"] = {"seeds": [0]}
    config = ablation_config(slab_dataset, teacher_run, grid)
    output = tmp_path / "ABL"
    lines: list[str] = []
    result = run_ablation(
        ablation_from_dict(config), output, log=lines.append, progress=False, jobs=jobs
    )
    if jobs > 1:  # each run's child process started once
        started = sorted(line.split()[1] for line in lines if line.startswith("started "))
        assert started == sorted(result.states)
    val = {r["cell"]: r["val_dice"] for r in result.results if r["seed"] == 0}
    assert val[LOW] == val["pmd_low"]  # one run, in both rows
    chosen = LOW if val[LOW] >= val[HIGH] else HIGH  # the first on a tie, as the grid chooses
    trained = {f"cells/pmd_low/seed{k}": "trained" for k in (0, 1)}
    trained[f"cells/{HIGH}/seed0"] = "trained"
    if chosen == HIGH:
        trained[f"cells/{HIGH}/seed1"] = "trained"
    assert result.states == trained
    assert not (output / "cells" / LOW).exists()
    if chosen == LOW:
        assert not (output / "cells" / HIGH / "seed1").exists()
    rows = [(r["cell"], r["seed"], r.get("same_run_as")) for r in result.results]
    assert (LOW, 0, "pmd_low") in rows and (
        chosen,
        1,
        None if chosen == HIGH else "pmd_low",
    ) in rows
    summary = json.loads((output / "summary.json").read_text(encoding="utf-8"))
    cell = summary["cells"]["pmd"]
    assert (cell["chosen"], cell["runs"]) == (chosen, 2)
    swept = {name: pytest.approx(val[name], abs=1e-6) for name in (LOW, HIGH)}
    assert cell["sweep_val_dice"] == swept
    runs_val = [r["val_dice"] for r in result.results if r["cell"] == chosen]
    assert cell["val_dice"] == pytest.approx(sum(runs_val) / 2, abs=1e-6)
    assert "seeds [0] x split seeds [0] only" in summary["selection"]
    stored = yaml.safe_load((output / "ablation.yaml").read_text(encoding="utf-8"))
    assert stored["sweep_selection"] == {"seeds": [0], "split_seeds": [0]}
    again = run_ablation(ablation_from_dict(config), output, log=lambda _: None, progress=False)
    assert set(again.states.values()) == {"finished"} and len(again.states) == len(trained)
    # a later pass of one cell reports the sweep an earlier pass finished, not one unfinished
    part = run_ablation(ablation_from_dict(config), output, log=lambda _: None, cells=["pmd_low"])
    assert {r["cell"] for r in part.results} == {"pmd_low", LOW, HIGH}
    assert "not_run" not in part.evidence and part.evidence["cells"]["pmd"]["chosen"] == chosen
    shutil.rmtree(output / "cells" / HIGH / "seed0" / "model")  # no longer finished
    part = run_ablation(ablation_from_dict(config), output, log=lambda _: None, cells=["pmd_low"])
    assert [r["cell"] for r in part.results] == ["pmd_low", "pmd_low"]
    assert part.evidence["not_run"] == [LOW, HIGH]
