"""The KD evidence grids of issue #15 (bench/kd_evidence/) load with the real ablation loader,
span the cells the issue asks for, and their run script parses."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from mtkd.ablation.grid import NO_KD
from mtkd.ablation.grid_config import load_ablation
from mtkd.config import load_config
from mtkd.engine.teacher_targets import ONLINE, PRECOMPUTED, teacher_targets

FOLDER = ROOT / "bench" / "kd_evidence"
STUDENTS = ("s1", "s2", "s3d")
LABEL_FREE = "_label_free"
GRIDS = sorted(p.stem for p in FOLDER.glob("*.yaml") if not p.stem.startswith("teacher"))
TEACHERS = sorted(p.stem for p in FOLDER.glob("teacher*.yaml"))
# the reported rows (methods) every labelled student grid must have
METHODS = {
    NO_KD,
    "paper",
    "paper_tuned",
    "pmd",
    "pmd_tuned",
    "infonce",
    "ee",
    "bb",
    "dd",
    "supcon",
    "hinton",
    "hinton_tuned",
    "cwd",
    "cwd_tuned",
    "dist",
    "dist_tuned",
    "paper_subject_negatives",
    "pmd_unlabelled",
    "hinton_unlabelled",
    "hinton_unlabelled_tuned",
    "cwd_unlabelled",
    "dist_unlabelled",
    "paper_unlabelled",
}


def test_the_grids_are_there():
    assert set(GRIDS) == set(STUDENTS) | {s + LABEL_FREE for s in STUDENTS}
    assert {"teacher2d", "teacher3d"} <= set(TEACHERS)


@pytest.mark.parametrize("grid", GRIDS)
def test_grid_expands(grid):
    """Every cell builds its run config (the loader does, with the engine's loss names), names
    are unique, and the evidence standards hold: >= 10 seeds, >= 2 splits, early stopping."""
    ablation = load_ablation(FOLDER / f"{grid}.yaml")
    names = [cell.name for cell in ablation.cells]
    assert len(names) == len(set(names))
    assert len(ablation.seeds) >= 10
    assert ablation.split_seeds is not None and len(ablation.split_seeds) >= 2
    assert ablation.teacher_row
    assert "{split_seed}" in ablation.base.distill.teacher
    for cell in ablation.cells:
        config = ablation.run_config(cell, ablation.seeds[-1], ablation.split_seeds[-1])
        assert config.train.patience is not None and config.train.patience >= 1
        assert config.train.epochs > config.train.patience * config.train.val_every
        # the grid's own teacher_targets reaches every run (it was once dropped)
        assert config.distill.teacher_targets == ablation.base.distill.teacher_targets


@pytest.mark.parametrize("grid", ["s3d", "s3d_label_free", "s2", "s2_label_free"])
def test_output_level_cells_take_the_teacher_targets_computed_once(grid):
    """The grids that set ``teacher_targets: auto``: every cell whose output term alone weighs
    precomputes the teacher's logits; a cell with a feature pair, and no KD, stays online."""
    ablation = load_ablation(FOLDER / f"{grid}.yaml")
    ways = {}
    for cell in ablation.cells:
        distill = ablation.run_config(cell, 0, ablation.split_seeds[0]).distill
        ways[cell.name] = teacher_targets(distill, stored_teacher=False)
        assert ways[cell.name] == (PRECOMPUTED if cell.output_loss and not cell.pairs else ONLINE)
    assert PRECOMPUTED in ways.values()


@pytest.mark.parametrize("student", STUDENTS)
def test_student_grid_has_the_issue_cells(student):
    ablation = load_ablation(FOLDER / f"{student}.yaml")
    methods = {cell.family for cell in ablation.cells}
    assert methods >= METHODS, sorted(METHODS - methods)
    # each sweep chosen on both split seeds and several seeds (validation only)
    selection = ablation.selection
    assert selection is not None and set(selection.split_seeds) == set(ablation.split_seeds)
    assert 3 <= len(selection.seeds) < len(ablation.seeds)
    by_name = {cell.name: cell for cell in ablation.cells}
    negatives = ablation.run_config(by_name["paper_subject_negatives"], 0, 0).distill
    assert negatives.negatives == "other_subjects"
    assert ablation.run_config(by_name["paper"], 0, 0).distill.negatives == "batch"
    families = [cell.family for cell in ablation.cells]
    tuned = sorted(family for family in set(families) if family.endswith("_tuned"))
    assert tuned == [f"{m}_tuned" for m in sorted(("cwd", "dist", "hinton", "hinton_unlabelled",
                                                   "paper", "pmd"))]  # fmt: skip
    assert all(families.count(family) == 3 for family in tuned)  # the same size of sweep
    for method in ("pmd", "cwd", "dist", "paper"):
        plain = ablation.run_config(by_name[method], 0, 0)
        extra = ablation.run_config(by_name[f"{method}_unlabelled"], 0, 0)
        assert plain.distill.unlabelled == "none"
        assert extra.distill.unlabelled == "train"
        # the same method: only the unlabelled images differ
        plain.distill.unlabelled = "train"
        extra.name = plain.name
        assert extra.to_dict() == plain.to_dict()


@pytest.mark.parametrize("student", STUDENTS)
def test_label_free_grid_is_its_student_without_labels(student):
    """Same recipe (data, split, model, budget) and teachers as the labelled grid; no labels,
    no no_kd row (it would have no loss), and its cells at the labelled grid's settings."""
    labelled = load_ablation(FOLDER / f"{student}.yaml")
    free = load_ablation(FOLDER / f"{student}{LABEL_FREE}.yaml")
    assert free.base.train_on == "none"
    assert free.base.distill.unlabelled == "train"
    assert free.seeds == labelled.seeds and free.split_seeds == labelled.split_seeds
    assert free.base.distill.teacher == labelled.base.distill.teacher
    recipe, base = free.recipe(), labelled.recipe()
    assert recipe.pop("train_on") == "none" and base.pop("train_on") == "student_train"
    assert recipe == base
    assert NO_KD not in {cell.name for cell in free.cells}
    assert {cell.name for cell in free.cells} >= {"pmd", "cwd", "paper"}
    by_name = {cell.name: cell for cell in labelled.cells}
    for cell in free.cells:
        ours = free.distill_section(cell, 0)
        theirs = labelled.distill_section(by_name[cell.name], 0)
        assert ours == {**theirs, "unlabelled": "train"}


def test_teachers_train_to_a_plateau_at_the_paper_setting():
    for name in TEACHERS:
        config = load_config(FOLDER / f"{name}.yaml")
        assert config.kind == "train" and config.multitask.reconstruction == "masked"
        assert config.train.patience is not None
        assert config.train.epochs >= 2 * config.train.patience * config.train.val_every
        expected = "masked" if name.endswith("_mae") else "all"
        assert config.multitask.reconstruction_loss_on == expected


@pytest.mark.parametrize("grid", ["s1", "s3d_label_free"])
def test_teacher_configs_follow_the_grid_split(grid, tmp_path):
    """teacher_config.py writes one teacher per split seed at the grid's split; a label-free
    grid gets its base student's teachers (identical files)."""
    student = grid.removesuffix(LABEL_FREE)
    teacher = "teacher3d" if student == "s3d" else "teacher2d"
    written = {}
    for name in (student, grid):
        out = tmp_path / name
        result = subprocess.run(
            [
                sys.executable,
                str(FOLDER / "teacher_config.py"),
                str(FOLDER / f"{name}.yaml"),
                str(FOLDER / f"{teacher}.yaml"),
                str(tmp_path / "cohort"),
                str(out),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        paths = [Path(line) for line in result.stdout.split()]
        assert [p.name for p in paths] == [f"{teacher}-split0.yaml", f"{teacher}-split1.yaml"]
        written[name] = [p.read_text(encoding="utf-8") for p in paths]
        for split_seed, path in enumerate(paths):
            config = load_config(path)
            assert config.split.seed == split_seed
            assert config.split.test_fraction == 0.25
    assert written[student] == written[grid]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_run_script_parses():
    subprocess.run(["bash", "-n", str(FOLDER / "run.sh")], check=True)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(
    ("student", "message"),
    [
        ("s3d", "s3d needs the carried teacher3d teachers"),
        ("s2_label_free", "s2_label_free needs the carried teacher2d teachers"),
        ("s4", "runs s1, s2 or s3d"),
    ],
)
def test_gpu_grid_refuses_a_student_whose_teachers_are_not_carried(student, message, tmp_path):
    """bench/kd_evidence/gpu_grid.sh checks its arguments before anything is set up (here the
    checkout carries no .devcarry)."""
    copy = tmp_path / "repo"
    (copy / "bench" / "kd_evidence").mkdir(parents=True)
    shutil.copy(FOLDER / "gpu_grid.sh", copy / "bench" / "kd_evidence")
    result = subprocess.run(
        ["bash", str(copy / "bench" / "kd_evidence" / "gpu_grid.sh"), student],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")},
    )
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "out").exists()
