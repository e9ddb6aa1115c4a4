"""The annotate-then-distill loop's bookkeeping against real MRML (``slicer-core``), real files
and real processes: a split pinned by patient through 30 additions, two processes adding
cases at once, a crash between the two writes, runs the loop did not start refused, versions
pinned by SHA-256 and the gate against a worse version. (The loop with real distillation
runs and real scoring: ``test_slicer_train.py``.)"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from slicer_scene import load_volume, new_scene

from mtkd.data.datasets import load_dataset
from mtkd.data.labels import LabelTable
from mtkd.data.segnrrd import write_segmentation
from mtkd.folder_lock import LOCK_NAME
from mtkd.library import ModelLibrary
from MTKDLib import training_set as training_set_module
from MTKDLib.distill_loop import LOOP_FILE, DistillLoop, loop_version_warning
from MTKDLib.loop_recipe import FineTuneRecipe
from MTKDLib.loop_scores import gate_reasons
from MTKDLib.loop_split import LoopSplit, pin_split
from MTKDLib.mrml_io import load_segmentation
from MTKDLib.train_config import TrainingOptions, build_config, write_config
from MTKDLib.training_set import SceneCase, TrainingSet, export_training_set

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> tuple[Path, Path]:
    """A 24 x 24 x 4 CT (NRRD) and its two-structure ``.seg.nrrd``."""
    folder = tmp_path_factory.mktemp("tiny")
    ct = np.full((4, 24, 24), -100, dtype=np.int16)
    ct[1:3, 4:12, 4:12] = 60
    ct[1:3, 14:20, 14:20] = 40
    labels = np.zeros(ct.shape, dtype=np.uint8)
    labels[1:3, 4:12, 4:12] = 1
    labels[1:3, 14:20, 14:20] = 2
    image = sitk.GetImageFromArray(ct)
    image.SetSpacing((1.5, 1.5, 3.0))
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(image)
    ct_path, seg_path = folder / "tiny.nrrd", folder / "tiny.seg.nrrd"
    sitk.WriteImage(image, str(ct_path))
    write_segmentation(label_image, LabelTable({1: "liver", 2: "spleen"}), seg_path)
    return ct_path, seg_path


def scene_case(scene, files, name: str) -> SceneCase:
    ct_path, seg_path = files
    volume = load_volume(scene, ct_path, name)
    return SceneCase(volume, load_segmentation(scene, seg_path, f"{name} labels", volume))


@pytest.fixture
def dataset(tiny_files, tmp_path) -> Path:
    """Six cases, two of them of one patient."""
    scene, _ = new_scene()
    folder = tmp_path / "dataset"
    export_training_set([scene_case(scene, tiny_files, f"c{k}") for k in range(5)], folder)
    TrainingSet(folder).add(scene_case(scene, tiny_files, "c0 again"), patient="c0")
    return folder


@pytest.fixture(scope="module")
def other_model(slab_dataset, tmp_path_factory) -> Path:
    """A second tiny model (other weights than the teacher's), one epoch."""
    from conftest import tiny_config

    from mtkd.config import RunConfig
    from mtkd.engine.trainer import Trainer

    run_dir = tmp_path_factory.mktemp("runs") / "other"
    config = tiny_config(slab_dataset, "train", name="other")
    config["train"]["epochs"] = 1
    Trainer(RunConfig.from_dict(config), run_dir, progress=False, log=lambda _: None).run()
    return run_dir


@pytest.fixture
def library(teacher_run, tmp_path) -> tuple[ModelLibrary, str]:
    library = ModelLibrary(tmp_path / "library")
    return library, library.import_model(teacher_run, name="abdomen student").key


def options_for(dataset: Path, teacher_run: Path) -> TrainingOptions:
    return TrainingOptions(dataset=str(dataset), teacher=str(teacher_run), student_fraction=0.5,
                           epochs=1, device="cpu")  # fmt: skip


def test_the_split_is_pinned_by_patient_through_30_additions(
    dataset, library, teacher_run, tiny_files, tmp_path
):
    library, key = library
    loop = DistillLoop(dataset, library)
    loop.begin(key, teacher_run, val=["c1"], test=["c0", "c0_again"])
    pinned = loop.split()
    assert (pinned.val, pinned.test) == (["c1"], ["c0", "c0_again"])
    scene, _ = new_scene()
    added = []
    for number in range(30):
        to_test = number == 7  # the option: a case for the test set instead
        added.append(loop.add_case(scene_case(scene, tiny_files, "c1"), to_test=to_test))
        split = loop.split()
        assert split.val == pinned.val
        assert split.test == pinned.test + ([added[7]] if number >= 7 else [])
        assert added[-1] in (split.test if to_test else split.train)
    assert len(set(added)) == 30 and "c1" not in added  # named like c1, never overwriting it
    assert loop.split().train == ["c2", "c3", "c4"] + added[:7] + added[8:]

    # each run gets the split explicitly and the student trains on every training case
    options, run_dir = loop.next_run(options_for(dataset, teacher_run), tmp_path / "runs")
    fixed = build_config(options)["split"]["fixed"]
    assert fixed["student_train"] == fixed["train"] == loop.split().train
    assert fixed["val"] == ["c1"] and fixed["test"] == loop.split().test
    assert options.student_fraction == 1.0 and run_dir.is_dir() and not any(run_dir.iterdir())
    loop.add_case(scene_case(scene, tiny_files, "late"))  # added after the run was started
    state = json.loads((dataset / LOOP_FILE).read_text(encoding="utf-8"))
    assert state["runs"][0]["split"] == fixed  # what the loop gave the run, kept
    # the engine reads what the loop wrote, patients included
    cases = {case.case_id: case for case in load_dataset(dataset).cases}
    assert len(cases) == 6 + 31 and cases["c0_again"].patient_id == "c0"


def test_cases_of_pinned_patients_are_refused(dataset, library, teacher_run, tiny_files):
    library, key = library
    loop = DistillLoop(dataset, library)
    loop.begin(key, teacher_run, val=["c1"], test=["c2"])
    scene, _ = new_scene()
    before = loop.training_set.case_ids()
    for patient, to_test, message in [
        ("c1", False, "validation"),
        ("c1", True, "validation"),
        ("c2", False, "test set"),
        ("c3", True, "training cases"),
    ]:
        with pytest.raises(ValueError, match=message):
            loop.add_case(scene_case(scene, tiny_files, "new"), patient=patient, to_test=to_test)
    assert loop.training_set.case_ids() == before  # nothing written
    case_id = loop.add_case(scene_case(scene, tiny_files, "new"), patient="c2", to_test=True)
    assert case_id in loop.split().test


def test_pinning_keeps_a_patient_together_and_needs_a_test_case():
    patients = {"a": "p1", "b": "p1", "c": "p2", "d": "p3", "e": "p4", "f": "p5"}
    with pytest.raises(ValueError, match="patient 'p1'.*one part"):
        pin_split(patients, val=["a"], test=["c"])
    with pytest.raises(ValueError, match="at least one test case"):
        pin_split(patients, val=["c"], test=[])
    with pytest.raises(ValueError, match="no case.*zz"):
        pin_split(patients, val=["zz"], test=["c"])
    chosen = pin_split(patients, seed=3)
    assert chosen["val"] and chosen["test"] and not set(chosen["val"]) & set(chosen["test"])
    split = LoopSplit.of(chosen, [{"case": c, "patient": p} for c, p in patients.items()])
    for part in (split.val, split.test):
        assert {"a", "b"} <= set(part) or not {"a", "b"} & set(part)  # p1 in one part
    with pytest.raises(ValueError, match="at least 3 patient|too few"):
        pin_split({"a": "a", "b": "b"})


def run_writer(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "Testing")]))
    return subprocess.Popen([sys.executable, str(HERE / "loop_writer.py"), *map(str, args)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def test_two_processes_adding_cases_at_once_lose_nothing(dataset, tiny_files):
    ct, seg = tiny_files
    writers = [run_writer("add", dataset, ct, seg, 6) for _ in range(2)]
    outputs = [writer.communicate(timeout=300) for writer in writers]
    assert [writer.returncode for writer in writers] == [0, 0], outputs
    written = [line for out, _ in outputs for line in out.split()]
    assert len(written) == len(set(written)) == 12  # each case its own id, all named "case"
    records = TrainingSet(dataset).records()
    assert [r["case"] for r in records][6:] != [] and len(records) == 6 + 12
    listed = json.loads((dataset / "dataset.json").read_text(encoding="utf-8"))["training"]
    assert len(listed) == 18 and {r["case"] for r in records} >= set(written)
    assert {e["image"] for e in listed} == {f"./imagesTr/{r['case']}.nii.gz" for r in records}
    assert len(load_dataset(dataset).cases) == 18
    assert not (dataset / LOCK_NAME).exists()
    assert not [p for p in (dataset / "imagesTr").iterdir() if p.name.startswith(".")]


def test_a_crash_between_the_two_writes_is_repaired(dataset, tiny_files):
    ct, seg = tiny_files
    crashed = run_writer("crash", dataset, ct, seg)
    out, err = crashed.communicate(timeout=300)
    assert crashed.returncode == -9, (out, err)  # killed between the writes, lock held
    assert (dataset / LOCK_NAME).exists()
    records = TrainingSet(dataset).records()
    listed = json.loads((dataset / "dataset.json").read_text(encoding="utf-8"))["training"]
    assert len(records) == 7 and len(listed) == 6  # the record is written, the index is not
    # the next writer recovers the dead process's lock and repairs the index first
    scene, _ = new_scene()
    new_id = TrainingSet(dataset).add(scene_case(scene, tiny_files, "case"))
    assert new_id == "case_2"
    listed = json.loads((dataset / "dataset.json").read_text(encoding="utf-8"))["training"]
    assert [e["image"] for e in listed][-2:] == ["./imagesTr/case.nii.gz",
                                                 "./imagesTr/case_2.nii.gz"]  # fmt: skip
    assert len(load_dataset(dataset).cases) == 8


def test_a_failed_index_write_leaves_a_repairable_set(dataset, tiny_files, monkeypatch):
    def fail(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(training_set_module, "write_dataset_json", fail)
    scene, _ = new_scene()
    with pytest.raises(OSError, match="disk full"):
        TrainingSet(dataset).add(scene_case(scene, tiny_files, "new"))
    monkeypatch.undo()
    assert not (dataset / LOCK_NAME).exists()  # released on the error
    assert TrainingSet(dataset).repair() == ["case 'new': listed in dataset.json again"]
    assert TrainingSet(dataset).repair() == []
    assert "new" in {case.case_id for case in load_dataset(dataset).cases}


def test_runs_the_loop_did_not_start_are_refused(dataset, library, teacher_run, tmp_path):
    library, key = library
    loop = DistillLoop(dataset, library)
    loop.begin(key, teacher_run, val=["c1"], test=["c2"])
    with pytest.raises(ValueError, match="not on this loop's training set"):
        loop.record(teacher_run)  # a finished run of another dataset
    unrelated = tmp_path / "plain-run"
    write_config(options_for(dataset, teacher_run), unrelated)  # this dataset, plain Start
    with pytest.raises(ValueError, match="did not start this run"):
        loop.record(unrelated)
    options, run_dir = loop.next_run(options_for(dataset, teacher_run), tmp_path / "runs")
    write_config(options, run_dir)
    with pytest.raises(ValueError, match="has not finished"):
        loop.record(run_dir)
    assert len(loop.versions()) == 1 and len(library.entries()) == 1
    # two presses of Distill again: two run folders
    _, second = loop.next_run(options_for(dataset, teacher_run), tmp_path / "runs")
    assert second != run_dir and second.name == run_dir.name + "-2"


def test_a_loop_run_fine_tunes_from_its_parent(dataset, library, teacher_run, tmp_path):
    """After the first version: the parent's weights, the recipe's learning rate and epochs
    (a tenth and a quarter with early stopping for the shorter recipe) and, with the anchor
    on, the parent as a second teacher; the run's configuration says so, and the loop keeps
    the recipe with the run."""
    library, key = library
    parent = str(library.path_of(key))
    panel = dataclasses.replace(options_for(dataset, teacher_run), epochs=20, learning_rate=0.01)
    anchored = FineTuneRecipe(anchor=True, anchor_weight=0.5)
    loop = DistillLoop(dataset, library, recipe=anchored)
    loop.begin(key, teacher_run, val=["c1"], test=["c2"])
    options, run_dir = loop.next_run(panel, tmp_path / "runs")
    assert options.learning_rate == pytest.approx(0.001) and options.epochs == 5
    assert options.patience == anchored.patience == 3 and options.init_from == parent
    assert options.anchor == parent and options.anchor_weight == 0.5
    config = build_config(options)
    assert config["train"]["patience"] == anchored.patience
    assert config["train"]["optimizer"]["lr"] == pytest.approx(0.001)
    assert config["distill"]["anchor"] == {"model": parent, "weight": 0.5, "temperature": 1.0}
    assert config["model"]["init_from"] == parent
    write_config(options, run_dir)  # the engine's reader takes it
    state = json.loads((dataset / LOOP_FILE).read_text(encoding="utf-8"))
    assert state["runs"][0]["recipe"] == dataclasses.asdict(anchored)

    # the loop's own recipe (measured best: the panel's learning rate and schedule, no
    # anchor), and a loop without validation cases (no early stopping: nothing to watch)
    other = tmp_path / "other"
    shutil.copytree(dataset, other, ignore=shutil.ignore_patterns(LOOP_FILE))
    loop = DistillLoop(other, library)
    loop.begin(key, teacher_run, val=[], test=["c2"])
    options, _ = loop.next_run(dataclasses.replace(panel, epochs=4), tmp_path / "runs")
    assert options.anchor is None and options.patience is None and options.epochs == 4
    assert options.learning_rate == pytest.approx(0.01) and options.init_from == parent
    assert FineTuneRecipe().apply(panel, parent, validation=False).patience is None
    assert "anchor" not in build_config(options)["distill"]
    with pytest.raises(ValueError, match="factors"):
        FineTuneRecipe(lr_factor=0)


def test_a_model_imported_again_under_the_same_key_is_refused(
    dataset, library, teacher_run, other_model, tmp_path
):
    library, key = library
    loop = DistillLoop(dataset, library)
    loop.begin(key, teacher_run, val=["c1"], test=["c2"])
    assert "version v1 (its current version)" in loop_version_warning(library, key, [dataset])
    library.delete(key)
    assert library.import_model(other_model, name="abdomen student").key == key
    for step in (lambda: loop.next_run(options_for(dataset, teacher_run), tmp_path / "runs"),
                 lambda: loop.switch(key)):  # fmt: skip
        with pytest.raises(ValueError, match="not version v1 any more.*SHA-256"):
            step()
    library.delete(key)
    with pytest.raises(ValueError, match="no longer in the model library"):
        loop.switch(key)


def test_the_gate_names_each_worse_structure():
    previous = {"liver": 0.90, "spleen": 0.80, "mean": 0.85}
    assert gate_reasons({"liver": 0.89, "spleen": 0.81, "mean": 0.85}, previous, 0.02) == []
    reasons = gate_reasons({"liver": 0.95, "spleen": 0.70, "mean": 0.825}, previous, 0.02, "v1")
    assert len(reasons) == 2
    assert reasons[0].startswith("spleen: Dice 0.700 against 0.800 for v1")
    assert reasons[1].startswith("mean Dice 0.825")
    assert gate_reasons({"liver": float("nan")}, previous) == []
