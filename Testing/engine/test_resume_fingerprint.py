"""A resumed run trains on what it started with (issue 14, item 4): ``RUN/fingerprint.json``
records the cases' files and the teacher; a resume after a label file changed, a case was
added or removed, or the teacher was replaced is refused naming the difference; unchanged
data resumes; a run made before fingerprints resumes with a warning."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import tiny_config
from helpers import stop_at_batch

from mtkd.cli import main
from mtkd.config import RunConfig
from mtkd.engine.trainer import Trainer, TrainingInterrupted
from mtkd.errors import MTKDError
from mtkd.run_folder import read_events


def quiet(config: RunConfig, run: Path, logs: list[str] | None = None, **options) -> Trainer:
    log = logs.append if logs is not None else (lambda _: None)
    return Trainer(config, run, progress=False, log=log, **options)


def resume(run: Path, logs: list[str] | None = None):
    from mtkd.run_folder import RunDir

    return quiet(RunDir(run).load_config(), run, logs, resume=True).run()


@pytest.fixture(scope="module")
def project(slab_dataset, teacher_run, tmp_path_factory) -> Path:
    """PROJECT/data (the slab cases), PROJECT/teacher (a tiny teacher) and PROJECT/run: a
    two-epoch distillation stopped in its first epoch. Tests work on copies of it."""
    folder, split = slab_dataset
    root = tmp_path_factory.mktemp("fingerprint") / "project"
    shutil.copytree(folder, root / "data")
    shutil.copytree(teacher_run / "model", root / "teacher")
    config = tiny_config(
        (root / "data", split),
        "distill",
        name="student",
        model={"name": "thesis_s1", "params": {}},
        train_on="student_train",
        distill={"teacher": str(root / "teacher")},
    )
    config["train"]["batch_size"] = 2
    trainer = quiet(RunConfig.from_dict(config), root / "run")
    stop_at_batch(trainer, 2)
    with pytest.raises(TrainingInterrupted):
        trainer.run()
    return root


@pytest.fixture(scope="module")
def other_teacher(slab_dataset, tmp_path_factory) -> Path:
    """Another tiny teacher (another seed): same network and labels, other weights."""
    config = tiny_config(slab_dataset, "train", name="teacher", train__epochs=1, train__seed=7)
    run = tmp_path_factory.mktemp("other") / "teacher"
    quiet(RunConfig.from_dict(config), run).run()
    return run / "model"


@pytest.fixture
def copy(project, tmp_path) -> Path:
    """A copy of the project (the run finds the copied data and teacher beside it)."""
    target = tmp_path / "project"
    shutil.copytree(project, target)
    return target


def refused(run: Path, *words: str) -> str:
    """Resume ``run``; it must be refused with an error naming the run and ``words``, and
    leave the checkpoint and the events as they were."""
    checkpoint = (run / "checkpoints" / "last.pt").read_bytes()
    metrics = [e for e in read_events(run / "events.jsonl") if e["type"] == "metrics"]
    with pytest.raises(MTKDError) as info:
        resume(run)
    message = str(info.value)
    assert message.startswith(f"{run}: cannot resume"), message
    for word in words:
        assert word in message, message
    assert (run / "checkpoints" / "last.pt").read_bytes() == checkpoint
    assert [e for e in read_events(run / "events.jsonl") if e["type"] == "metrics"] == metrics
    return message


def edit_one_voxel(path: Path) -> None:
    """A label corrected by one voxel, written back under the same name and time stamp."""
    stat = path.stat()
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    index = tuple(int(i) for i in np.argwhere(array == 0)[0])
    array[index] = 1
    edited = sitk.GetImageFromArray(array)
    edited.CopyInformation(image)
    sitk.WriteImage(edited, str(path), True)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_run_records_its_fingerprint(project):
    recorded = json.loads((project / "run" / "fingerprint.json").read_text())
    cases = recorded["data"]["cases"]
    images = sorted(p.name.removesuffix(".nii.gz") for p in (project / "data" / "images").iterdir())
    assert sorted(cases) == images
    first = cases[images[0]]
    assert (
        first["image"]["size"]
        == (project / "data" / "images" / f"{images[0]}.nii.gz").stat().st_size
    )
    assert len(first["image"]["sha256"]) == 64 and len(first["label"]["sha256"]) == 64
    assert recorded["teacher"]["kind"] == "run"
    assert {"model.pt", "mtkd_model.json"} <= set(recorded["teacher"]["content"]["files"])


def test_unchanged_data_resumes(copy):
    before = (copy / "run" / "fingerprint.json").read_bytes()
    result = resume(copy / "run")
    assert result.epochs == 2 and (copy / "run" / "model" / "mtkd_model.json").is_file()
    assert read_events(copy / "run" / "events.jsonl")[-1]["type"] == "done"
    assert (copy / "run" / "fingerprint.json").read_bytes() == before


def test_a_changed_label_file_is_refused(copy):
    case = sorted((copy / "data" / "labels").iterdir())[3]
    edit_one_voxel(case)
    refused(copy / "run", f"case(s) changed: {case.name.removesuffix('.nii.gz')} (label)")


def test_an_added_case_is_refused(copy):
    data = copy / "data"
    for folder in ("images", "labels"):
        shutil.copy(data / folder / "slab00.nii.gz", data / folder / "slab99.nii.gz")
    refused(copy / "run", "case(s) added: slab99")


def test_a_removed_case_is_refused(copy):
    data = copy / "data"
    for folder in ("images", "labels"):
        (data / folder / "slab01.nii.gz").unlink()
    message = refused(copy / "run", "case(s) removed: slab01")
    assert "added" not in message and "changed:" not in message


def test_a_different_teacher_is_refused(copy, other_teacher):
    shutil.rmtree(copy / "teacher")
    shutil.copytree(other_teacher, copy / "teacher")
    refused(copy / "run", "the teacher changed", "model.pt")


def test_a_run_without_fingerprint_resumes_with_a_warning(copy):
    """Runs made before fingerprints: resumed with a warning (in the log and the events),
    and their fingerprint is recorded for the next resume."""
    run = copy / "run"
    (run / "fingerprint.json").unlink()
    logs: list[str] = []
    resume(run, logs)
    warnings = [line for line in logs if "no fingerprint.json" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning:")
    assert any(
        "no fingerprint.json" in e.get("message", "") for e in read_events(run / "events.jsonl")
    )
    assert json.loads((run / "fingerprint.json").read_text())["data"]["cases"]


def test_the_cli_names_the_difference_in_one_line(copy, capsys):
    (copy / "data" / "images" / "slab02.nii.gz").unlink()
    (copy / "data" / "labels" / "slab02.nii.gz").unlink()
    code = main(["distill", "--resume", str(copy / "run")])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1
    assert error[0].startswith(f"mtkd: error: {copy / 'run'}: cannot resume")
    assert "case(s) removed: slab02" in error[0]


def test_an_edit_of_the_same_size_and_time_changes_the_fingerprint(tmp_path):
    """Size and modification time alone miss an edit in an uncompressed label map: the
    content is hashed."""
    from mtkd.engine.fingerprint import content_digest

    path = tmp_path / "label.nrrd"
    array = np.zeros((4, 8, 8), np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path), False)
    before, stat = content_digest(path), path.stat()
    array[2, 3, 4] = 1
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path), False)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = content_digest(path)
    assert path.stat().st_mtime_ns == stat.st_mtime_ns and after["size"] == before["size"]
    assert after["sha256"] != before["sha256"]
