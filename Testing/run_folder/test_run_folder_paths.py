"""A run folder works from any working directory, and after it moved (with or without its
data): its ``config.yaml`` stores each path relative to the run folder and absolute beside it,
and reading it tries the relative path, then the absolute one. A relative path in a
configuration file the user writes is read from that file's folder (one rule everywhere).

The runs are made as ``mtkd demo --output runs/demo`` makes them: from paths relative to the
working directory of that moment (the project folder); every command then runs elsewhere.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import DATA, tiny_config
from helpers import stop_at_batch

from mtkd.cli import main
from mtkd.config import RunConfig, load_config
from mtkd.engine.trainer import Trainer, TrainingInterrupted
from mtkd.errors import MTKDError
from MTKDLib.train_config import TrainingOptions, write_config

TINY_NET = {"name": "thesis_unet", "params": {"channels": [4, 8], "bottleneck": 16}}


def train(config: dict, run_dir: str, stop_after_batch: int | None = None) -> None:
    trainer = Trainer(RunConfig.from_dict(config), run_dir, progress=False, log=lambda _: None)
    if stop_after_batch is None:
        trainer.run()
        return
    stop_at_batch(trainer, stop_after_batch)
    with pytest.raises(TrainingInterrupted):
        trainer.run()


@pytest.fixture(scope="module")
def made_with_teacher(slab_dataset, tmp_path_factory) -> Path:
    """A project folder: data/ (the slab dataset) and runs/teacher (finished), trained with the
    project folder as the working directory and paths relative to it."""
    project = tmp_path_factory.mktemp("made") / "project"
    shutil.copytree(slab_dataset[0], project / "data")
    config = tiny_config(("data", slab_dataset[1]), "train", name="teacher", train__epochs=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        train(config, "runs/teacher")
    return project


@pytest.fixture
def project(made_with_teacher, slab_dataset, tmp_path, monkeypatch) -> Path:
    """A copy of the project plus runs/student: a distillation from runs/teacher stopped
    after its first batch (a checkpoint to resume), made from the project folder as well. The
    test then runs in another, empty working directory."""
    copy = tmp_path / "made" / "project"
    shutil.copytree(made_with_teacher, copy)
    config = tiny_config(
        ("data", slab_dataset[1]),
        "distill",
        name="student",
        model=TINY_NET,
        train__epochs=1,
        distill={"teacher": "runs/teacher", "preset": "thesis"},
    )
    monkeypatch.chdir(copy)
    train(config, "runs/student", stop_after_batch=1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return copy


def stored(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


def test_a_run_stores_its_paths_relative_to_the_run_folder_and_absolute(project):
    student = stored(project / "runs" / "student")
    assert student["data"]["source"] == "../../data"
    assert student["distill"]["teacher"] == "../teacher"
    labels = DATA.resolve() / "labels_total_v2.json"
    assert student["absolute_paths"] == {
        "data.source": str((project / "data").resolve()),
        "data.labels_json": str(labels),
        "distill.teacher": str((project / "runs" / "teacher").resolve()),
    }
    assert (project / "runs" / "student" / student["data"]["labels_json"]).resolve() == labels
    # read back from another working directory: absolute, found
    config = load_config(project / "runs" / "student" / "config.yaml")
    assert config.data.source == str((project / "data").resolve())
    assert config.distill.teacher == str((project / "runs" / "teacher").resolve())


@pytest.mark.slow
def test_resume_export_evaluate_and_distill_from_another_working_directory(project, capsys):
    runs = project / "runs"
    assert Path.cwd() != project
    assert main(["distill", "--resume", str(runs / "student")]) == 0
    assert (runs / "student" / "model" / "model.pt").is_file()
    # the export takes its CT sample from the run's test cases
    assert main(["export", str(runs / "student"), "--format", "onnx", "-o", "onnx"]) == 0
    assert Path("onnx").is_dir()
    assert main(["distill", str(runs / "student" / "config.yaml"), "--run-dir", "other"]) == 0
    assert (Path("other") / "model" / "model.pt").is_file()
    # the new run's config names the same data, now relative to its own folder
    other = stored(Path("other"))
    assert (Path("other") / other["data"]["source"]).resolve() == (project / "data").resolve()
    split = runs / "student" / "split.json"
    command = ["evaluate", str(runs / "student"), str(project / "data"), "--split", str(split)]
    command += ["--labels-json", str(DATA / "labels_total_v2.json"), "--csv", "scores.csv"]
    assert main(command) == 0
    assert Path("scores.csv").is_file()
    assert "error" not in capsys.readouterr().err


def test_a_run_moved_with_its_data_resumes_and_exports(project, tmp_path):
    moved = tmp_path / "new" / "parent" / "project"
    moved.parent.mkdir(parents=True)
    shutil.move(project, moved)
    assert not project.exists()  # the absolute paths stored in the runs are gone
    student = moved / "runs" / "student"
    assert main(["distill", "--resume", str(student)]) == 0
    assert main(["export", str(student), "--format", "torchscript", "-o", "ts"]) == 0
    # the resumed run's lineage names the teacher where it is now
    config = load_config(student / "config.yaml")
    assert config.distill.teacher == str((moved / "runs" / "teacher").resolve())
    assert config.data.source == str((moved / "data").resolve())


def test_a_run_moved_without_its_data_uses_the_absolute_paths(project, tmp_path):
    alone = tmp_path / "server" / "student"
    shutil.copytree(project / "runs" / "student", alone)  # data and teacher stay where they are
    assert main(["distill", "--resume", str(alone)]) == 0
    config = load_config(alone / "config.yaml")
    assert config.data.source == str((project / "data").resolve())
    assert config.distill.teacher == str((project / "runs" / "teacher").resolve())


def test_a_run_whose_data_is_nowhere_names_the_key_the_paths_and_the_run_folder(
    project, tmp_path, capsys
):
    assert main(["distill", "--resume", str(project / "runs" / "student")]) == 0  # finished
    alone = tmp_path / "server" / "student"
    shutil.move(project / "runs" / "student", alone)
    shutil.move(project / "data", tmp_path / "data-moved-away")
    capsys.readouterr()
    assert main(["distill", "--resume", str(alone)]) == 2
    error = capsys.readouterr().err
    for text in (
        "config key 'data.source'",
        str((alone.parent.parent / "data").resolve()),  # ../../data from the run folder
        str((project / "data").resolve()),  # where it was
        f"run folder {alone.resolve()}",
    ):
        assert text in error, error
    assert main(["export", str(alone), "--format", "torchscript", "-o", "ts"]) == 2
    error = capsys.readouterr().err
    assert "cannot find the run's sample case" in error and "--sample" in error
    assert "config key 'data.source'" in error and f"run folder {alone.resolve()}" in error


def test_a_config_file_s_relative_paths_are_read_from_its_folder(project, tmp_path):
    folder = project / "configs"
    folder.mkdir()
    text = "kind: distill\ndata: {source: ../data}\ndistill: {teacher: ../runs/teacher}\n"
    (folder / "student.yaml").write_text(text)
    config = load_config(folder / "student.yaml")  # the working directory is elsewhere
    assert config.data.source == str((project / "data").resolve())
    assert config.distill.teacher == str((project / "runs" / "teacher").resolve())
    (folder / "missing.yaml").write_text("kind: distill\ndistill: {teacher: ../nowhere}\n")
    missing = load_config(folder / "missing.yaml")
    with pytest.raises(MTKDError) as error:
        missing.check_paths()
    message = str(error.value)
    assert "config key 'distill.teacher'" in message and str(project / "nowhere") in message


def test_mtkd_train_writes_the_config_as_a_run_does(project, tmp_path):
    """MTKD Train's Start writes RUN/config.yaml; its Resume and the GPU-server commands read it
    from any working directory, and after the run folder moved with its data."""
    options = TrainingOptions(
        dataset=str(project / "data"), teacher=str(project / "runs" / "teacher"), name="s"
    )
    path = write_config(options, project / "runs" / "slicer")
    written = yaml.safe_load(path.read_text())
    assert written["data"]["source"] == "../../data"
    assert written["distill"]["teacher"] == "../teacher"
    moved = tmp_path / "gpu-server" / "project"
    shutil.move(project, moved)
    config = load_config(moved / "runs" / "slicer" / "config.yaml")
    assert config.data.source == str((moved / "data").resolve())
    assert config.distill.teacher == str((moved / "runs" / "teacher").resolve())
    assert os.path.isdir(config.distill.teacher)
