"""bench/kd_evidence/archive.py: the light files of a tiny grid's finished runs archived, the
grid folder lost, the runs restored into a new one: `mtkd ablate` trains none of them again
and reports the same scores; another cohort is refused, a retrained teacher keeps its distilled
runs out (not the no-KD ones), a run folder holding a checkpoint is never overwritten, and
real_ct.py leaves the restored runs (without weights) out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import load_bench_script
from test_ablate import evidence_config, plain_teacher, quiet  # noqa: F401 (a fixture)
from test_cohort_digest import write_cohort

import mtkd.ablation.results
from mtkd.ablation.grid_config import ablation_from_dict
from mtkd.ablation.run import run_ablation
from mtkd.engine.trainer import Trainer

RUNS = ["cells/no_kd/split0/seed0", "cells/cwd/split0/seed0"]
LIGHT = [
    "config.yaml",
    "split.json",
    "fingerprint.json",
    "events.jsonl",
    "model/mtkd_model.json",
    "report/ablation_result.json",
    "report/test_scores.csv",
    "report/history.json",
]


@pytest.fixture(scope="module")
def archive():
    return load_bench_script("kd_evidence/archive.py", "archive_bench")


@pytest.fixture(scope="module")
def grid(slab_dataset, plain_teacher, tmp_path_factory, archive):  # noqa: F811
    """no_kd and cwd at split seed 0, seed 0 (1 epoch), trained and archived. Returns the grid
    config, the folder holding ABL, ARCHIVE and the cohort, the teacher and the first pass."""
    root = tmp_path_factory.mktemp("archived")
    config = evidence_config(slab_dataset, plain_teacher)
    config["ablation"].update(seeds=[0], split_seeds=[0])
    first = run_ablation(ablation_from_dict(config), root / "ABL", log=quiet, progress=False)
    cohort = write_cohort(root / "cohort")
    teacher = Path(str(plain_teacher).format(split_seed=0))
    save = ["save", str(root / "ABL"), str(root / "ARCHIVE"), "--cohort", str(cohort)]
    assert archive.main([*save, "--teacher", str(teacher)]) == 0
    return config, root, teacher, first


def restore(archive, root, target, *teachers, cohort="cohort"):
    arguments = ["restore", str(root / "ARCHIVE"), str(root / target)]
    arguments += ["--cohort", str(root / cohort)]
    return archive.main(arguments + [arg for t in teachers for arg in ("--teacher", str(t))])


def retrained(teacher, folder):
    """A copy of ``teacher`` (same name) whose model has other weights, as a retrained one."""
    copy = folder / "retrained" / "teacher-split0"
    shutil.copytree(teacher, copy)
    metadata = copy / "model" / "mtkd_model.json"
    data = json.loads(metadata.read_text())
    data["weights_sha256"] = "f" * 64
    metadata.write_text(json.dumps(data))
    return copy


def test_a_restored_grid_is_scored_from_the_archive_without_training(
    grid, archive, tmp_path, capsys, monkeypatch
):
    config, root, teacher, first = grid
    stored = sorted(
        p.relative_to(root / "ARCHIVE").as_posix()
        for p in (root / "ARCHIVE").rglob("*")
        if p.is_file()
    )
    assert stored == sorted(
        ["ablation.yaml", "manifest.json"] + [f"{r}/{n}" for r in RUNS for n in LIGHT]
    )
    manifest = json.loads((root / "ARCHIVE" / "manifest.json").read_text())
    teacher_model = json.loads((teacher / "model" / "mtkd_model.json").read_text())
    assert manifest == {
        "cohort_digest": archive.cohort_digest(root / "cohort"),
        "teachers": {"0": teacher_model["weights_sha256"]},
    }
    capsys.readouterr()
    save = ["save", str(root / "ABL"), str(root / "ARCHIVE"), "--cohort", str(root / "cohort")]
    assert archive.main([*save, "--teacher", str(teacher)]) == 0
    assert "0 run(s) archived, 2 unchanged, 0 removed" in capsys.readouterr().out

    restored = tmp_path / "ABL"  # the grid folder lost: a new one (at the same depth)
    assert restore(archive, root, restored, teacher) == 0
    assert "2 run(s) restored into" in capsys.readouterr().out
    assert not list(restored.rglob("*.pt")) and (restored / "ablation.yaml").is_file()

    def no_training(*_args, **_kwargs):
        raise AssertionError("a restored run was trained or its weights loaded")

    monkeypatch.setattr(Trainer, "run", no_training)
    monkeypatch.setattr(mtkd.ablation.results, "load_model", no_training)
    again = run_ablation(ablation_from_dict(config), restored, log=quiet, progress=False)
    assert again.states == {run: "finished" for run in RUNS}
    assert first.states == {run: "trained" for run in RUNS}

    assert [r["run"] for r in again.results] == RUNS
    assert [r["dice"] for r in again.results] == [r["dice"] for r in first.results]
    # the whole records, per-case scores included (JSON: a missed structure's NaN equals NaN)
    assert json.dumps(again.results, sort_keys=True) == json.dumps(first.results, sort_keys=True)


def test_real_ct_leaves_the_restored_runs_out(grid, archive, tmp_path, capsys):
    _, root, teacher, _ = grid
    real_ct = load_bench_script("kd_evidence/real_ct.py", "real_ct_bench")
    assert restore(archive, root, tmp_path / "ABL", teacher) == 0
    table = tmp_path / "real_ct.csv"
    table.write_text("cell,split_seed,seed,structure,dice,hd95\nno_kd,0,0,liver,0.5,3.0\n")
    assert real_ct.main([str(tmp_path / "ABL"), str(table)]) == 0
    printed = capsys.readouterr()
    assert "2 run(s) restored from the archive (no weights here): not scored" in printed.out
    assert "1 restored run(s) have no rows" in printed.err and "cwd 0 0" in printed.err
    assert table.read_text().count("\n") == 2


def test_another_cohort_is_refused(grid, archive, tmp_path, capsys):
    _, root, teacher, _ = grid
    other = write_cohort(tmp_path / "other", voxel_value=2)
    assert restore(archive, root, tmp_path / "ABL", teacher, cohort=other) == 1
    assert f"{other} is not the cohort of the runs archived in" in capsys.readouterr().err
    assert not (tmp_path / "ABL").exists()
    manifest = (root / "ARCHIVE" / "manifest.json").read_bytes()
    save = ["save", str(root / "ABL"), str(root / "ARCHIVE"), "--cohort", str(other)]
    assert archive.main(save) == 1
    assert (root / "ARCHIVE" / "manifest.json").read_bytes() == manifest
    assert restore(archive, tmp_path, "ABL", teacher) == 0  # no archive: nothing to restore
    assert "nothing to restore" in capsys.readouterr().out and not (tmp_path / "ABL").exists()


def test_a_retrained_teacher_keeps_the_distilled_runs_out(grid, archive, tmp_path, capsys):
    _, root, teacher, _ = grid
    new_teacher = retrained(teacher, tmp_path)
    assert restore(archive, root, tmp_path / "ABL", new_teacher) == 0
    printed = capsys.readouterr().out
    assert "1 distilled run(s) not restored; split 0: distilled from the teacher weights" in printed
    assert "1 run(s) restored" in printed
    assert (tmp_path / "ABL" / RUNS[0] / "model" / "mtkd_model.json").is_file()  # no_kd
    assert not (tmp_path / "ABL" / RUNS[1]).exists()
    assert restore(archive, root, tmp_path / "none", cohort="cohort") == 0  # no teacher given
    assert "split 0: no finished --teacher of this split seed was given" in capsys.readouterr().out
    # saved with the retrained teacher: the archived run of the old one goes, no_kd stays
    shutil.copytree(root / "ARCHIVE", tmp_path / "ARCHIVE")
    save = ["save", str(root / "ABL"), str(tmp_path / "ARCHIVE"), "--cohort", str(root / "cohort")]
    assert archive.main([*save, "--teacher", str(new_teacher)]) == 0
    assert "1 removed" in capsys.readouterr().out
    assert (tmp_path / "ARCHIVE" / RUNS[0] / "model" / "mtkd_model.json").is_file()
    assert not (tmp_path / "ARCHIVE" / RUNS[1] / "model").exists()
    manifest = json.loads((tmp_path / "ARCHIVE" / "manifest.json").read_text())
    assert manifest["teachers"] == {"0": "f" * 64}


def test_a_run_folder_holding_a_checkpoint_is_not_overwritten(grid, archive, tmp_path, capsys):
    _, root, teacher, _ = grid
    stopped = tmp_path / "ABL" / RUNS[1]
    (stopped / "checkpoints").mkdir(parents=True)
    (stopped / "checkpoints" / "last.pt").write_bytes(b"a checkpoint")
    (stopped / "config.yaml").write_text("mine")
    failed = tmp_path / "ABL" / RUNS[0]  # a run that failed before its first checkpoint
    failed.mkdir(parents=True)
    (failed / "events.jsonl").write_text('{"type": "error"}\n')
    assert restore(archive, root, tmp_path / "ABL", teacher) == 0
    printed = capsys.readouterr().out
    assert "1 run(s) restored" in printed and "1 already there" in printed
    assert (stopped / "config.yaml").read_text() == "mine"
    assert (stopped / "checkpoints" / "last.pt").read_bytes() == b"a checkpoint"
    assert not (stopped / "model").exists()
    archived = root / "ARCHIVE" / RUNS[0]
    for name in LIGHT:
        assert (failed / name).read_bytes() == (archived / name).read_bytes()
