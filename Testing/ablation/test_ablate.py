"""`mtkd ablate`: a tiny grid (tiny nets, 32x32 slices of the real CT, the session's tiny
teacher) trained, scored, tabulated and plotted end to end; continued without redoing finished
runs, resumed after an interruption; the grid's configuration errors."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import sys

import matplotlib.image
import pytest
import yaml
from conftest import ablation_config, tiny_config
from helpers import expect_error

from mtkd.ablation.folder import claim_folder
from mtkd.ablation.grid import cell_name
from mtkd.ablation.report import markdown_table, mean_std, summarise_cells, write_plots
from mtkd.ablation.run import (
    ablation_from_dict,
    load_ablation,
    run_ablation,
    selected_cells,
)
from mtkd.ablation.tensorboard import event_scalars, mirror_run, summary_writer_class
from mtkd.cli import main
from mtkd.config import RunConfig, load_config
from mtkd.engine.trainer import Trainer, TrainingInterrupted
from mtkd.errors import MTKDError
from mtkd.run_folder import read_events

GRID = {
    "seeds": [5],  # replaced by --seeds 0 1 below
    "cells": [
        {"pairs": ["E-E", "B-B", "D-D"], "feature_loss": "infonce", "output_loss": "pmd"},
        {"pairs": ["B"], "feature_loss": "mse", "output_loss": "cwd"},
    ],
    "include": ["no_kd", "teacher"],
}
CELLS = ["no_kd", "EBD-infonce-pmd", "B-mse-cwd"]
RUNS = [(cell, seed) for cell in CELLS for seed in (0, 1)]
STOPPED = 3  # the 4th run (EBD-infonce-pmd, seed 1) is stopped at its first batch
PNG = b"\x89PNG\r\n\x1a\n"


def quiet(_line: str) -> None:
    pass


def test_a_grid_moved_with_its_data_continues_and_other_data_is_another_grid(
    slab_dataset, teacher_run, tmp_path
):
    """``ablation.yaml`` stores its paths relative to the ablation folder (absolute beside
    them), the parent version its cells anchor to included: after the folder moved together
    with its data, teacher and parent, the same grid continues there; a grid on other data is
    still refused."""
    folder, split = slab_dataset
    project = tmp_path / "project"
    shutil.copytree(folder, project / "data")
    shutil.copytree(teacher_run, project / "teacher")
    shutil.copytree(teacher_run, project / "parent")

    def claim(where, data):
        config = ablation_config((data, split), where / "teacher", {"seeds": [0]})
        config["distill"]["anchor"] = {"model": str(where / "parent"), "weight": 0.5}
        claim_folder(where / "ABL", ablation_from_dict(config))

    claim(project, project / "data")
    stored = yaml.safe_load((project / "ABL" / "ablation.yaml").read_text(encoding="utf-8"))
    assert stored["teacher"] == "../teacher"
    assert stored["recipe"]["data"]["source"] == "../data"
    anchors = [cell["distill"]["anchor"]["model"] for cell in stored["cells"]]
    assert anchors and set(anchors) == {"../parent"}
    assert stored["absolute_paths"]["../data"] == str((project / "data").resolve())
    assert stored["absolute_paths"]["../parent"] == str((project / "parent").resolve())

    moved = tmp_path / "elsewhere" / "project"
    moved.parent.mkdir()
    shutil.move(project, moved)
    claim(moved, moved / "data")  # the same grid: no error
    shutil.copytree(folder, tmp_path / "other-data")
    with pytest.raises(MTKDError, match="another ablation grid"):
        claim(moved, tmp_path / "other-data")


@pytest.fixture(scope="module")
def grid(slab_dataset, teacher_run, tmp_path_factory):
    """A grid of 2 KD cells and no KD x 2 seeds, and the teacher: stopped (as by SIGTERM)
    inside its 4th run, then completed by the CLI. Returns the folder, what the CLI printed,
    the config file and the events of the runs finished before the stop."""
    folder = tmp_path_factory.mktemp("ablation")
    config = folder / "ablation_config.yaml"
    config.write_text(yaml.safe_dump(ablation_config(slab_dataset, teacher_run, GRID)))
    output = folder / "ABL"
    stopped_run = f"{RUNS[STOPPED][0]}-seed{RUNS[STOPPED][1]}"
    original = Trainer._batch_loss

    def stopping(self, *args):
        if self.config.name == stopped_run:
            self.stop.request("SIGTERM")
        return original(self, *args)

    ablation = ablation_from_dict(yaml.safe_load(config.read_text()), seeds=[0, 1], device="cpu")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_batch_loss", stopping)
        with pytest.raises(TrainingInterrupted, match="again to continue"):
            run_ablation(ablation, output, log=quiet, progress=False)
    runs = [output / "cells" / cell / f"seed{seed}" for cell, seed in RUNS]
    assert all((run / "model").is_dir() for run in runs[:STOPPED])
    assert (runs[STOPPED] / "checkpoints" / "last.pt").is_file()
    assert not (runs[STOPPED] / "model").exists()
    assert not any(run.exists() for run in runs[STOPPED + 1 :])
    finished = {run: (run / "events.jsonl").read_bytes() for run in runs[:STOPPED]}

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        args = ["ablate", str(config), "-o", str(output), "--seeds", "0", "1", "--device", "cpu"]
        assert main(args) == 0
    return output, printed.getvalue(), config, finished


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_grid_writes_results_summary_and_plots(grid):
    output, printed, _, _ = grid
    rows = read_csv(output / "results.csv")
    assert [(r["cell"], r["seed"]) for r in rows] == [("teacher", "")] + [
        (cell, seed) for cell in CELLS for seed in ("0", "1")
    ]
    students = [r for r in rows if r["role"] != "teacher"]
    assert len({r["parameters"] for r in students}) == 1  # one student network for all
    assert int(rows[0]["parameters"]) > int(students[0]["parameters"])
    for row in rows:
        assert 0.0 <= float(row["dice"]) <= 1.0
        assert {"dice_liver", "dice_spleen", "dice_kidney_right"} <= set(row)
    for row in students:
        assert row["epochs"] == "1" and float(row["train_seconds"]) > 0
        scores = read_csv(output / row["run"] / "report" / "test_scores.csv")
        # the missed count next to the mean HD95 is the run's missed structure-volumes
        assert int(row["missed"]) == sum(s["outcome"] == "missed" for s in scores)
        assert int(row["spurious"]) == sum(s["outcome"] == "spurious" for s in scores)
        assert all(s["hd95_mm"] != "inf" for s in scores)
    b_rows = [r for r in students if r["cell"] == "B-mse-cwd"]
    assert [(r["pairs"], r["feature_loss"], r["output_loss"]) for r in b_rows] == [
        ("B-B", "mse", "cwd")
    ] * 2

    summary = read_csv(output / "summary.csv")
    assert [r["cell"] for r in summary] == ["teacher", *CELLS]
    assert [r["seeds"] for r in summary] == ["1", "2", "2", "2"]
    for row in summary[1:]:
        dice = [float(r["dice"]) for r in rows if r["cell"] == row["cell"]]
        mean, std = mean_std(dice)
        assert float(row["dice_mean"]) == pytest.approx(mean, abs=1e-5)
        assert float(row["dice_std"]) == pytest.approx(std, abs=1e-5)
    assert summary[0]["dice_std"] == "nan"  # one teacher, no spread

    markdown = (output / "summary.md").read_text(encoding="utf-8")
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| cell | role | pairs |")
    assert "| HD95 (mm) | missed |" in table[0]
    assert "image's diagonal in mm" in markdown
    assert len(table) == 1 + 4
    assert "**teacher**" in table[1] and "**no KD**" in table[2]
    assert all(" ± " in line for line in table[2:])
    assert "E-E+B-B+D-D" in table[3]
    assert table[0] in printed and table[3] in printed  # the CLI prints the table
    for name in ("dice.png", "curves.png"):
        data = (output / "plots" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    image = matplotlib.image.imread(output / "plots" / "dice.png")
    assert image.ndim == 3 and image.shape[0] > 300


@pytest.mark.slow
def test_interrupted_grid_was_continued_not_redone(grid):
    """The CLI run after the stop: the 3 finished runs were not rerun (their events are
    unchanged), the stopped one was resumed from its checkpoint, the rest trained."""
    output, printed, _, finished = grid
    states = {}
    for line in printed.splitlines():
        if line.startswith("[") and "/6] " in line:
            run, _, rest = line.partition(": ")
            states[run.split("] ")[1]] = rest.split(";")[0]
    expected = ["finished"] * STOPPED + ["resumed"] + ["trained"] * (len(RUNS) - STOPPED - 1)
    assert states == {f"{cell} seed {seed}": e for (cell, seed), e in zip(RUNS, expected)}
    for run, events in finished.items():
        assert (run / "events.jsonl").read_bytes() == events
    cell, seed = RUNS[STOPPED]
    events = read_events(output / "cells" / cell / f"seed{seed}" / "events.jsonl")
    assert [e["resume"] for e in events if e.get("state") == "preparing"] == [False, True]
    assert [e["state"] for e in events if e.get("state") == "interrupted"] == ["interrupted"]


@pytest.mark.slow
def test_cells_share_data_split_recipe_and_epochs(grid):
    output, _, _, _ = grid
    recipes, splits = [], []
    for cell in CELLS:
        for seed in (0, 1):
            run = output / "cells" / cell / f"seed{seed}"
            config = load_config(run / "config.yaml").to_dict()
            assert config["train"]["seed"] == seed
            distill = config.pop("distill")
            if cell == "no_kd":
                assert distill["scale"] == 0.0  # the same recipe with zero KD weight
                meta = json.loads((run / "model" / "mtkd_model.json").read_text())
                assert meta["lineage"]["distilled"] is False
            else:
                assert distill["preset"] == "thesis" and distill["output"]["weight"] == 0.2
            if cell == "EBD-infonce-pmd":
                assert distill["feature_loss"] == "infonce" and distill["output"]["loss"] == "pmd"
                assert distill["scale_weights"] == {"E-E": 0.1, "B-B": 0.2, "D-D": 0.1}
            if cell == "B-mse-cwd":
                assert distill["feature_loss"] == "mse" and distill["output"]["loss"] == "cwd"
                assert distill["scale_weights"] == {"E-E": 0.0, "B-B": 0.2, "D-D": 0.0}
                terms = [e for e in read_events(run / "events.jsonl") if e["type"] == "metrics"]
                assert "B-B" in terms[0] and "E-E" not in terms[0] and "cwd" in terms[0]
            config.pop("name")
            config["train"].pop("seed")
            recipes.append(config)
            splits.append((run / "split.json").read_text())
    assert all(recipe == recipes[0] for recipe in recipes)
    assert all(split == splits[0] for split in splits)
    assert recipes[0]["train"]["epochs"] == 1


@pytest.mark.slow
def test_running_again_redoes_nothing_and_a_changed_grid_is_refused(grid, capsys):
    output, _, config, _ = grid
    runs = sorted((output / "cells").glob("*/seed*"))
    before = {run: (run / "events.jsonl").read_bytes() for run in runs}
    result = run_ablation(
        ablation_from_dict(yaml.safe_load(config.read_text()), seeds=[0, 1]), output, log=quiet
    )
    assert set(result.states.values()) == {"finished"} and len(result.states) == 6
    assert {run: (run / "events.jsonl").read_bytes() for run in runs} == before
    assert [r["cell"] for r in result.summary] == ["teacher", *CELLS]

    assert main(["ablate", str(config), "-o", str(output), "--seeds", "0"]) == 2
    error = capsys.readouterr().err
    assert "another ablation grid" in error and "seeds" in error


@pytest.mark.slow
def test_a_grid_that_gains_a_cell_continues_and_a_changed_cell_is_refused(grid, tmp_path, capsys):
    """A cell added to a grid trains its runs only, the others stay as they are and
    ablation.yaml records the new cell list; a cell kept under its name must not change."""
    output, _, config, _ = grid
    moved = tmp_path / "ABL"
    shutil.copytree(output, moved)
    runs = sorted((moved / "cells").glob("*/seed*"))
    before = {run: (run / "events.jsonl").read_bytes() for run in runs}
    data = yaml.safe_load(config.read_text())
    added = {"name": "hinton_w", "pairs": [], "output_loss": "pmd", "set": {"output.weight": 1}}
    data["ablation"]["cells"].append(added)
    result = run_ablation(ablation_from_dict(data, seeds=[0, 1]), moved, log=quiet)
    trained = sorted(key for key, state in result.states.items() if state != "finished")
    assert trained == ["cells/hinton_w/seed0", "cells/hinton_w/seed1"]
    assert {run: (run / "events.jsonl").read_bytes() for run in runs} == before
    stored = yaml.safe_load((moved / "ablation.yaml").read_text(encoding="utf-8"))
    assert [cell["name"] for cell in stored["cells"]] == [*CELLS, "hinton_w"]
    assert [r["cell"] for r in result.summary] == ["teacher", *CELLS, "hinton_w"]

    added["set"]["output.weight"] = 2  # the same name, another cell
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert main(["ablate", str(changed), "-o", str(moved), "--seeds", "0", "1"]) == 2
    error = capsys.readouterr().err
    assert "another ablation grid" in error and "cells.hinton_w." in error


@pytest.mark.slow
def test_tensorboard_mirror_of_a_finished_run(grid, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output, _, _, _ = grid
    run = output / "cells" / "EBD-infonce-pmd" / "seed0"
    assert mirror_run(run, tmp_path / "tb") > 0
    assert mirror_run(run, tmp_path / "tb") > 0  # again: replaced, not appended
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1
    accumulator = EventAccumulator(str(tmp_path / "tb"))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"loss/loss", "loss/seg", "loss/B-B", "loss/pmd", "val/dice"} <= tags
    assert [s.step for s in accumulator.Scalars("val/dice")] == [1]


def test_event_scalars_and_a_missing_tensorboard(monkeypatch):
    events = [
        {"type": "status", "state": "initial_validation", "val_dice": 0.5},
        {"type": "metrics", "epoch": 1, "epochs": 2, "loss": 1.0, "B-B": 0.3, "lr": 0.01},
        {"type": "metrics", "epoch": 1, "loss": 0.9, "val_dice_per_structure": {"liver": 0.7}},
    ]
    scalars = event_scalars(events)
    assert scalars[0] == {"val/dice": 0.5}
    assert scalars[1] == {"loss/loss": 0.9, "val/dice_liver": 0.7}  # the last record wins
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(MTKDError, match="pip install tensorboard"):
        summary_writer_class()


def test_the_summary_reports_missed_structures_next_to_hd95():
    """Per cell: the mean over seeds of the missed (and spurious) structure-volumes per run,
    beside the mean HD95, in summary.csv and summary.md."""
    runs = [
        {"cell": "teacher", "role": "teacher", "dice": 0.8, "hd95_mm": 5.0},
        {"cell": "kd", "role": "kd", "seed": 0, "dice": 0.5, "hd95_mm": 90.0},
        {"cell": "kd", "role": "kd", "seed": 1, "dice": 0.6, "hd95_mm": 50.0},
    ]
    for run, missed, spurious in zip(runs, (0, 2, 1), (0, 1, 0)):
        run.update(missed=missed, spurious=spurious)
    summary = summarise_cells(runs, [])
    assert [(r["missed_mean"], r["spurious_mean"]) for r in summary][1] == (1.5, 0.5)
    lines = markdown_table(summary).splitlines()
    header = [cell.strip() for cell in lines[0].split("|")]
    kd = [cell.strip() for cell in lines[3].split("|")]
    column = header.index("missed")
    assert header[column - 1] == "HD95 (mm)"
    assert kd[column] == "1.5 +0.5 spurious"
    assert [cell.strip() for cell in lines[2].split("|")][column] == "0"


def test_plots_are_skipped_without_matplotlib(monkeypatch, tmp_path):
    import mtkd.ablation.report as report

    monkeypatch.setattr(report, "_matplotlib", lambda: None)
    notes = []
    assert write_plots(tmp_path, [], {}, notes.append) == {}
    assert "matplotlib is not installed" in notes[0]


def test_grid_product_names_and_deduplication(slab_dataset, teacher_run):
    section = {
        "seeds": [0, 1, 2],
        "pairs": [["E-E", "B-B", "D-D"], ["D-D", "B"], []],
        "feature_losses": ["infonce", "mse"],
        "output_losses": ["pmd", "none"],
        "include": ["teacher"],
    }
    ablation = ablation_from_dict(ablation_config(slab_dataset, teacher_run, section))
    names = [cell.name for cell in ablation.cells]
    assert names == [
        "no_kd",  # [] x none: the no-KD student, once, first
        "EBD-infonce-pmd",
        "EBD-infonce-none",
        "EBD-mse-pmd",
        "EBD-mse-none",
        "BD-infonce-pmd",
        "BD-infonce-none",
        "BD-mse-pmd",
        "BD-mse-none",
        "pmd-only",  # [] x pmd: one cell whatever the feature loss
    ]
    assert ablation.teacher_row
    no_kd = ablation.run_config(ablation.cells[0], 2)
    assert no_kd.distill.scale == 0.0 and no_kd.train.seed == 2
    assert no_kd.name == "no_kd-seed2"
    assert cell_name(("B-B",), "mse", None) == "B-mse-none"
    without_output = ablation.run_config(ablation.cells[2], 0).distill  # EBD-infonce-none
    assert without_output.output.weight == 0.0 and without_output.scale == 1.0
    assert without_output.scale_weights == {"E-E": 0.1, "B-B": 0.2, "D-D": 0.1}
    output_only = ablation.run_config(ablation.cells[-1], 0).distill  # pmd-only
    assert output_only.scale_weights == {"E-E": 0.0, "B-B": 0.0, "D-D": 0.0}
    assert output_only.feature_loss is None and output_only.output.weight == 0.2
    default = ablation_from_dict(ablation_config(slab_dataset, teacher_run, {}))
    assert [c.name for c in default.cells] == ["no_kd", "EBD-infonce-pmd"]
    assert default.seeds == [0, 1, 2] and default.teacher_row


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda c: c.pop("ablation"), "'ablation:' section"),
        (lambda c: c["ablation"].update(seed=[1]), "unknown config key(s) seed in 'ablation'"),
        (lambda c: c["ablation"].update(seeds=[0, "1"]), "config key 'ablation.seeds[1]'"),
        (lambda c: c["ablation"].update(seeds=[1, 1]), "config key 'ablation.seeds'"),
        (lambda c: c["ablation"].update(pairs=[["E-E", "X-X"]]), "'ablation.pairs[0][1]'"),
        (lambda c: c["ablation"].update(feature_losses=["nce"]), "'ablation.feature_losses'"),
        (lambda c: c["ablation"].update(output_losses=["kl"]), "'ablation.output_losses'"),
        (lambda c: c["ablation"].update(include=["student"]), "'ablation.include[0]'"),
        (lambda c: c["ablation"].update(cells=[{"pairs": []}], pairs=[[]]), "'ablation.pairs'"),
        (lambda c: c["ablation"].update(cells=[{"loss": "mse"}]), "'ablation.cells[0]'"),
        (lambda c: c["ablation"].update(cells=[{"name": "teacher"}]), "'ablation.cells[0].name'"),
        (lambda c: c["ablation"].update(cells=[{"name": "a/b"}]), "'ablation.cells[0].name'"),
        (lambda c: c["ablation"].update(cells=[{}, {}]), "'ablation.cells[1].name'"),
        (lambda c: c.update(kind="train"), "config key 'kind'"),
        (lambda c: c["distill"].update(preset="all_scales"), "config key 'distill.preset'"),
        (lambda c: c["distill"].update(feature_loss="mse"), "'distill.feature_loss'"),
        (lambda c: c["distill"].update(scale_weights={"B-B": 0}), "'distill.scale_weights.B-B'"),
        (lambda c: c["split"]["fixed"].pop("test"), "config key 'split.fixed.test'"),
        (lambda c: c["train"].update(epochs=0), "config key 'train.epochs'"),
    ],
)
def test_config_errors_name_the_key(slab_dataset, teacher_run, tmp_path, change, key):
    config = ablation_config(slab_dataset, teacher_run, {"seeds": [0]})
    config["split"]["fixed"] = dict(config["split"]["fixed"])
    change(config)
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(config))
    with expect_error(path, key):
        load_ablation(path)


def test_an_unrelated_output_folder_is_refused(slab_dataset, teacher_run, tmp_path):
    ablation = ablation_from_dict(ablation_config(slab_dataset, teacher_run, {"seeds": [0]}))
    (tmp_path / "other.txt").write_text("not an ablation")
    with pytest.raises(MTKDError, match="no ablation.yaml"):
        run_ablation(ablation, tmp_path, log=quiet)


# ------------------------------------------------ split seeds, sweeps and the evidence files
EVIDENCE_CELLS = [{"name": "cwd", "pairs": [], "output_loss": "cwd", "set": {"output.weight": 3}}]
EVIDENCE_RUNS = [
    (cell, split, seed) for cell in ("no_kd", "cwd") for split in (0, 1) for seed in (0, 1)
]
RUNS_HEADER = "cell,split_seed,seed,case,structure,dice,hd95,missed"


@pytest.fixture(scope="module")
def plain_teacher(slab_dataset, tmp_path_factory):
    """Two copies of one tiny teacher without reconstruction head: teacher-split0, -split1."""
    folder = tmp_path_factory.mktemp("teachers")
    config = tiny_config(slab_dataset, "train", name="teacher")
    config["multitask"] = {"reconstruction": "none"}
    config["train"]["epochs"] = 1
    Trainer(RunConfig.from_dict(config), folder / "teacher-split0", progress=False, log=quiet).run()
    shutil.copytree(folder / "teacher-split0", folder / "teacher-split1")
    return folder / "teacher-split{split_seed}"


def evidence_config(slab_dataset, teacher, cells=EVIDENCE_CELLS) -> dict:
    section = {"seeds": [0, 1], "split_seeds": [0, 1], "include": ["no_kd"], "cells": cells}
    config = ablation_config(slab_dataset, teacher, section)
    config["split"] = {"seed": 0, "val_fraction": 0.2, "test_fraction": 0.2}
    config["split"]["student_fraction"] = 0.5
    return config


@pytest.fixture(scope="module")
def evidence_grid(slab_dataset, plain_teacher, tmp_path_factory):
    """no_kd and cwd x 2 split seeds x 2 seeds, 1 epoch: stopped inside its 3rd run, then
    continued. Returns the folder, the runs.csv rows at the stop and the final result."""
    output = tmp_path_factory.mktemp("evidence") / "ABL"
    config = evidence_config(slab_dataset, plain_teacher)
    original = Trainer._batch_loss
    stopped = "no_kd-split1-seed0"

    def stopping(self, *args):
        if self.config.name == stopped:
            self.stop.request("SIGTERM")
        return original(self, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_batch_loss", stopping)
        with pytest.raises(TrainingInterrupted, match="no_kd split 1 seed 0"):
            run_ablation(ablation_from_dict(config), output, log=quiet, progress=False)
    at_stop = read_csv(output / "runs.csv")
    result = run_ablation(ablation_from_dict(config), output, log=quiet, progress=False)
    return output, at_stop, result


@pytest.mark.slow
def test_runs_csv_has_a_row_per_run_case_and_structure_and_survives_a_stop(evidence_grid):
    output, at_stop, result = evidence_grid
    text = (output / "runs.csv").read_text(encoding="utf-8")
    assert text.splitlines()[0] == RUNS_HEADER
    rows = read_csv(output / "runs.csv")
    keys = [(r["cell"], r["split_seed"], r["seed"], r["case"], r["structure"]) for r in rows]
    assert len(keys) == len(set(keys))  # unique after the resume
    runs = list(dict.fromkeys((c, int(k), int(s)) for c, k, s, _, _ in keys))
    assert runs == EVIDENCE_RUNS
    assert {(r["cell"], r["split_seed"], r["seed"]) for r in at_stop} == {
        ("no_kd", "0", "0"),
        ("no_kd", "0", "1"),
    }  # written as the runs finished
    assert [r for r in rows if (r["cell"], r["split_seed"]) == ("no_kd", "0")] == at_stop
    tests = {}
    for split in (0, 1):
        run = output / "cells" / "cwd" / f"split{split}" / "seed0"
        split_file = json.loads((run / "split.json").read_text())
        tests[split] = split_file["test"]
        assert load_config(run / "config.yaml").split.seed == split
        assert load_config(run / "config.yaml").distill.teacher.endswith(f"teacher-split{split}")
        scores = read_csv(run / "report" / "test_scores.csv")
        mine = [
            r for r in rows if (r["cell"], r["split_seed"], r["seed"]) == ("cwd", str(split), "0")
        ]
        assert [(r["case"], r["structure"]) for r in mine] == [
            (s["case"], s["structure"]) for s in scores
        ]
        for row, score in zip(mine, scores):
            expected = float("nan") if score["hd95_mm"] == "n/a" else float(score["hd95_mm"])
            assert float(row["hd95"]) == pytest.approx(expected, rel=1e-5, nan_ok=True)
            assert row["missed"] == str(int(score["outcome"] == "missed"))
    assert tests[0] != tests[1]  # each split seed its own patients
    assert {r["case"] for r in rows if r["split_seed"] == "1"} == set(tests[1])
    assert set(result.states.values()) == {"finished", "resumed", "trained"}


@pytest.mark.slow
def test_summary_json_of_the_grid(evidence_grid):
    output, _, result = evidence_grid
    summary = json.loads((output / "summary.json").read_text(encoding="utf-8"))
    assert summary == result.evidence
    assert (summary["student"], summary["seeds"], summary["split_seeds"]) == ("tiny-ablation", 2, 2)
    assert set(summary["cells"]) == {"no_kd", "cwd"}
    assert summary["recommended"] in {"no_kd", "cwd"}
    results = [r for r in read_csv(output / "results.csv") if r["role"] != "teacher"]
    assert len(results) == 8 and all(r["val_dice"] for r in results)
    for name, cell in summary["cells"].items():
        val = [float(r["val_dice"]) for r in results if r["cell"] == name]
        assert cell["val_dice"] == pytest.approx(sum(val) / len(val), abs=1e-5)
        low, high = cell["diff_vs_nokd"]["ci95"]
        assert low <= cell["diff_vs_nokd"]["mean"] <= high
        assert cell["runs"] == 4
    best = max(summary["cells"], key=lambda name: summary["cells"][name]["val_dice"])
    assert summary["recommended"] == best
    assert summary["cells"]["no_kd"]["diff_vs_nokd"] == {"mean": 0, "ci95": [0, 0], "pairs": 12}
    assert "| cell | chosen on validation |" in (output / "evidence.md").read_text(encoding="utf-8")
    assert "seeds 0, 1 x split seeds 0, 1" in (output / "summary.md").read_text(encoding="utf-8")


def test_sweeps_expand_into_named_sub_cells(slab_dataset, plain_teacher):
    cells = [
        {
            "name": "cwd",
            "pairs": [],
            "output_loss": "cwd",
            "set": {"output.temperature": 4},
            "sweep": {"output.weight": [1, 3], "scale": [0.5, 1.0]},
        },
        {
            "name": "paper",
            "pairs": ["E-E", "B-B", "D-D"],
            "feature_loss": "infonce",
            "output_loss": "pmd",
        },
    ]
    ablation = ablation_from_dict(evidence_config(slab_dataset, plain_teacher, cells))
    names = [cell.name for cell in ablation.cells]
    assert names == [
        "no_kd",
        "cwd[output.weight=1,scale=0.5]",
        "cwd[output.weight=1,scale=1]",
        "cwd[output.weight=3,scale=0.5]",
        "cwd[output.weight=3,scale=1]",
        "paper",
    ]
    assert [cell.family for cell in ablation.cells] == ["no_kd"] + ["cwd"] * 4 + ["paper"]
    config = ablation.run_config(ablation.cells[3], 1, 1)
    assert (config.split.seed, config.train.seed) == (1, 1)
    assert config.distill.output.weight == 3 and config.distill.output.temperature == 4
    assert (
        config.distill.scale == 0.5 and config.name == "cwd[output.weight=3,scale=0.5]-split1-seed1"
    )
    assert config.distill.teacher == str(plain_teacher).replace("{split_seed}", "1")
    stored = ablation.to_dict()
    assert stored["split_seeds"] == [0, 1]
    assert stored["cells"][1]["set"] == {"output.temperature": 4, "output.weight": 1, "scale": 0.5}
    assert stored["cells"][1]["method"] == "cwd"
    legacy = ablation_from_dict(ablation_config(slab_dataset, plain_teacher, {"seeds": [0]}))
    assert "split_seeds" not in legacy.to_dict() and legacy.splits == [0]
    assert all("set" not in cell for cell in legacy.to_dict()["cells"])
    # --cells: a swept method's name selects its sub-cells, a sub-cell's name itself
    selected = selected_cells(ablation, ["paper", "cwd"])
    assert [cell.name for cell in selected] == names[1:]  # in the grid's order
    chosen = selected_cells(ablation, ["cwd[output.weight=1,scale=1]", "no_kd"])
    assert [cell.name for cell in chosen] == ["no_kd", "cwd[output.weight=1,scale=1]"]


def test_the_recipe_s_unlabelled_images_and_negatives_reach_every_cell(slab_dataset, plain_teacher):
    """``distill.unlabelled``, ``distill.negatives`` and ``distill.teacher_targets`` of the
    recipe hold for each cell (its ``set`` may change them); the word ``train`` is never taken
    for a folder."""
    cells = [
        {"name": "pmd", "pairs": [], "output_loss": "pmd"},
        {"name": "pmd_labelled", "pairs": [], "output_loss": "pmd", "set": {"unlabelled": "none"}},
    ]
    config = evidence_config(slab_dataset, plain_teacher, cells)
    config["distill"] |= {"unlabelled": "train", "negatives": "other_subjects"}
    config["distill"]["teacher_targets"] = "auto"
    ablation = ablation_from_dict(config)
    by_name = {cell.name: cell for cell in ablation.cells}
    kd = ablation.run_config(by_name["pmd"], 0, 0).distill
    assert (kd.unlabelled, kd.negatives, kd.teacher_targets) == ("train", "other_subjects", "auto")
    # the default leaves the cells' sections as older grids stored them
    del config["distill"]["teacher_targets"]
    cells_stored = ablation_from_dict(config).to_dict()["cells"]
    assert all("teacher_targets" not in cell["distill"] for cell in cells_stored)
    assert ablation.run_config(by_name["pmd_labelled"], 0, 0).distill.unlabelled == "none"
    assert ablation.run_config(by_name["no_kd"], 0, 0).distill.scale == 0.0


@pytest.mark.parametrize(
    ("cell", "key"),
    [
        (
            {"output_loss": "cwd", "set": {"output.loss": "pmd"}},
            "'ablation.cells[0].set.output.loss'",
        ),
        ({"output_loss": "cwd", "set": {"teacher": "x"}}, "'ablation.cells[0].set.teacher'"),
        ({"output_loss": "none", "set": {"output.weight": 1}}, "cells[0].set.output.weight"),
        ({"output_loss": "cwd", "set": [1]}, "'ablation.cells[0].set'"),
        ({"output_loss": "cwd", "sweep": {"scale": 1}}, "'ablation.cells[0].sweep.scale'"),
        ({"output_loss": "cwd", "sweep": {"scale": [1, 1.0]}}, "'ablation.cells[0].sweep.scale'"),
        ({"output_loss": "cwd", "set": {"scale": 1}, "sweep": {"scale": [1]}}, "sweep.scale"),
        ({"output_loss": "cwd", "set": {"no_such_key": 1}}, "ablation.cells (cwd-only)"),
        ({"pairs": [], "output_loss": "none", "set": {"scale": 2}}, "'ablation.cells[0]'"),
    ],
)
def test_set_and_sweep_errors_name_the_key(slab_dataset, plain_teacher, tmp_path, cell, key):
    cell = {"pairs": [], **cell}
    config = ablation_config(slab_dataset, plain_teacher, {"seeds": [0], "cells": [cell]})
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(config))
    with expect_error(path, key):
        load_ablation(path)


def test_data_and_teacher_overrides_replace_the_config_paths(
    slab_dataset, plain_teacher, tmp_path, monkeypatch
):
    """``mtkd ablate --data --teacher`` (run.sh's cohort and teachers): paths relative to the
    working directory, ``{split_seed}`` kept; the config's own paths otherwise."""
    folder, _ = slab_dataset
    path = tmp_path / "grid" / "ablation.yaml"
    path.parent.mkdir()
    config = evidence_config(slab_dataset, "elsewhere/teacher", EVIDENCE_CELLS)
    config["data"]["source"] = "no-such-cohort"
    path.write_text(yaml.safe_dump(config))
    plain = load_ablation(path)
    assert plain.base.data.source == str(path.parent / "no-such-cohort")
    monkeypatch.chdir(plain_teacher.parent)
    ablation = load_ablation(path, data_source=folder, teacher=plain_teacher.name)
    assert ablation.base.data.source == str(folder)
    assert ablation.teacher(1) == str(plain_teacher.parent / "teacher-split1")


def write_grid(config: dict, folder) -> str:
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return str(path)


@pytest.mark.slow
def test_jobs_train_runs_side_by_side_with_the_same_results(
    slab_dataset, plain_teacher, evidence_grid, tmp_path
):
    """`--jobs 2`: each run trains in its own process (its config and log in jobs/), and the
    grid's files are those of the one-job grid: same runs, cases and scores."""
    sequential, _, _ = evidence_grid
    grid = write_grid(evidence_config(slab_dataset, plain_teacher), tmp_path)
    output = tmp_path / "ABL"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(["ablate", grid, "-o", str(output), "--jobs", "2"]) == 0
    logs = sorted(path.name for path in (output / "jobs").glob("*.log"))
    assert logs == sorted(f"{c}-split{k}-seed{s}.log" for c, k, s in EVIDENCE_RUNS)
    assert all("finished:" in (output / "jobs" / log).read_text() for log in logs)
    assert printed.getvalue().count("started cells/") == len(EVIDENCE_RUNS)
    ours, theirs = read_csv(output / "runs.csv"), read_csv(sequential / "runs.csv")
    key = ("cell", "split_seed", "seed", "case", "structure", "missed")
    assert [tuple(r[k] for k in key) for r in ours] == [tuple(r[k] for k in key) for r in theirs]
    for mine, other in zip(ours, theirs):
        for column in ("dice", "hd95"):
            expected = pytest.approx(float(other[column]), abs=1e-3, nan_ok=True)
            assert float(mine[column]) == expected
    with contextlib.redirect_stdout(io.StringIO()) as again:  # nothing left to train
        assert main(["ablate", grid, "-o", str(output), "--jobs", "2"]) == 0
    assert "started" not in again.getvalue() and "finished; test Dice" in again.getvalue()


@pytest.mark.slow
def test_a_stopped_jobs_grid_stops_its_children_and_continues(
    slab_dataset, plain_teacher, tmp_path
):
    """SIGTERM to `mtkd ablate --jobs 2` while both its runs train: each child stops at a safe
    point (its checkpoint saved), the grid exits 130; run again, both runs are resumed."""
    import signal
    import subprocess
    import time

    config = evidence_config(slab_dataset, plain_teacher)
    # two seeds of one cell: two runs that start alike, so that neither can finish before the
    # other has begun training (no_kd, without a teacher to load, could)
    config["ablation"].update(seeds=[0, 1], split_seeds=[0], include=[])
    config["train"]["epochs"] = 25  # long enough to be stopped inside both runs
    grid = write_grid(config, tmp_path)
    output = tmp_path / "ABL"
    command = [sys.executable, "-m", "mtkd", "ablate", grid, "-o", str(output), "--jobs", "2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = [output / "cells" / "cwd" / "split0" / f"seed{seed}" for seed in (0, 1)]
    deadline = time.monotonic() + 300

    def training(run) -> bool:
        events = run / "events.jsonl"
        return events.is_file() and '"type": "metrics"' in events.read_text()

    while not all(training(run) for run in runs):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    assert "run the same `mtkd ablate` command" in stderr
    for run in runs:  # each child stopped itself at a safe point, its checkpoint saved
        last = read_events(run / "events.jsonl")[-1]
        assert (last["type"], last["state"], last["signal"]) == ("status", "interrupted", "SIGTERM")
        assert (run / "checkpoints" / "last.pt").is_file()
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(["ablate", grid, "-o", str(output), "--jobs", "2"]) == 0
    assert printed.getvalue().count("(resuming from its checkpoint; log") == 2
    rows = read_csv(output / "runs.csv")
    assert list(dict.fromkeys((r["cell"], r["split_seed"], r["seed"]) for r in rows)) == [
        ("cwd", "0", "0"),
        ("cwd", "0", "1"),
    ]


def test_jobs_must_be_positive_and_share_the_cores(slab_dataset, plain_teacher, tmp_path):
    from mtkd.ablation.parallel import threads_per_job

    config = evidence_config(slab_dataset, plain_teacher)
    with pytest.raises(MTKDError, match="--jobs must be at least 1, got 0"):
        run_ablation(ablation_from_dict(config), tmp_path / "ABL", log=quiet, jobs=0)
    assert not (tmp_path / "ABL").exists()
    assert [threads_per_job(j, cpus=16) for j in (1, 2, 3, 16, 32)] == [16, 8, 5, 1, 1]


@pytest.mark.slow
def test_cells_runs_part_of_a_grid_and_the_reports_say_so(slab_dataset, plain_teacher, tmp_path):
    """`--cells cwd`: only that cell's runs, summary.json lists the cells not run and
    evidence.md says PARTIAL; a later call without --cells runs the rest and is complete."""
    config = evidence_config(slab_dataset, plain_teacher)
    config["ablation"].update(seeds=[0], split_seeds=[0])
    grid = write_grid(config, tmp_path)
    output = tmp_path / "ABL"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["ablate", grid, "-o", str(output), "--cells", "cwd"]) == 0
    assert [r["cell"] for r in read_csv(output / "results.csv")] == ["cwd"]
    assert not (output / "cells" / "no_kd").exists()
    summary = json.loads((output / "summary.json").read_text(encoding="utf-8"))
    assert (list(summary["cells"]), summary["not_run"]) == (["cwd"], ["no_kd"])
    assert "PARTIAL: the grid's cells no_kd were not run" in (output / "evidence.md").read_text(
        encoding="utf-8"
    )
    result = run_ablation(ablation_from_dict(config), output, log=quiet, progress=False)
    assert result.states == {
        "cells/no_kd/split0/seed0": "trained",
        "cells/cwd/split0/seed0": "finished",
    }
    assert "not_run" not in result.evidence and "PARTIAL" not in (output / "evidence.md").read_text(
        encoding="utf-8"
    )
    # a later pass of one cell still reports the cells an earlier pass finished
    again = run_ablation(ablation_from_dict(config), output, log=quiet, cells=["cwd"])
    assert [r["cell"] for r in again.results] == ["no_kd", "cwd"]
    assert set(again.states.values()) == {"finished"} and "not_run" not in again.evidence
    with pytest.raises(MTKDError, match="no cell 'pmd'; its cells are no_kd, cwd"):
        run_ablation(ablation_from_dict(config), output, log=quiet, cells=["pmd"])
