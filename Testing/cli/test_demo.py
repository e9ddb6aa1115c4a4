"""`mtkd demo --quick`: the main job end to end on the bundled CT (two epochs per model), and
the demo's dataset: slabs of the whole CT, split by slab."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from conftest import DATA

from mtkd.cli import main
from mtkd.config import RECOMMENDED_PRESET, load_config
from mtkd.data.labels import LabelTable
from mtkd.demo import STRUCTURES, write_whole_ct_slabs
from mtkd.run_folder import read_events

CT, SEG, NAMES = (
    DATA / "abdomen_ct.nii.gz",
    DATA / "abdomen_seg_total_fast.nii.gz",
    DATA / "labels_total_v2.json",
)


def slab_has_structures(label_file: Path) -> bool:
    """Whether a slab's label map holds any of the demo's structures."""
    table = LabelTable.from_json(NAMES)
    wanted = [value for value, name in table.items() if name in STRUCTURES]
    return bool(np.isin(sitk.GetArrayFromImage(sitk.ReadImage(str(label_file))), wanted).any())


@pytest.mark.slow  # three models, two epochs each on the whole CT's 23 training slabs
def test_quick_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--quick", "--output", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    table = [line.split() for line in printed.splitlines()]
    rows = {
        line[0]: line
        for line in table
        if line and line[0] in {"teacher", "student_kd", "student_nokd"}
    }
    assert set(rows) == {"teacher", "student_kd", "student_nokd"}
    assert rows["student_kd"][1] == rows["student_nokd"][1]  # the same student network
    # held out: test slabs are in no training list of any of the three runs
    for run in ("teacher", "student_kd", "student_nokd"):
        split = json.loads((tmp_path / run / "split.json").read_text())
        assert not set(split["test"]) & (set(split["train"]) | set(split["val"]))
        assert set(split["student_train"]) <= set(split["train"])
    kd_lineage = json.loads((tmp_path / "student_kd" / "model" / "mtkd_model.json").read_text())[
        "lineage"
    ]
    assert kd_lineage["teacher"]["path"] == str((tmp_path / "teacher" / "model").resolve())
    assert kd_lineage["distilled"] is True
    nokd = json.loads((tmp_path / "student_nokd" / "model" / "mtkd_model.json").read_text())
    assert nokd["lineage"]["distilled"] is False
    # the distilled student has the recommended recipe: its terms also on the training slabs
    # it has no labels of; the no-KD twin has no use for them
    kd_config = load_config(tmp_path / "student_kd" / "config.yaml")
    assert kd_config.distill.preset == RECOMMENDED_PRESET
    student_split = json.loads((tmp_path / "student_kd" / "split.json").read_text())
    unlabelled = len(student_split["train"]) - len(student_split["student_train"])
    for run, cases in (("student_kd", unlabelled), ("student_nokd", 0)):
        events = read_events(tmp_path / run / "events.jsonl")
        (training,) = [e for e in events if e["type"] == "status" and e["state"] == "training"]
        assert training["unlabelled_cases"] == cases, run
    assert unlabelled > 0
    segmentation = slicerio.read_segmentation(str(tmp_path / "abdomen_student.seg.nrrd"))
    assert [segment["name"] for segment in segmentation["segments"]] == STRUCTURES
    # the models trained on negatives too: slabs below the organs, in the teacher's and the
    # students' training sets
    teacher_split = json.loads((tmp_path / "teacher" / "split.json").read_text())
    labels = tmp_path / "dataset" / "labels"
    for part in ("train", "student_train"):
        kinds = {slab_has_structures(labels / f"{case}.nii.gz") for case in teacher_split[part]}
        assert kinds == {True, False}, part


def test_demo_dataset_covers_the_whole_ct_split_by_slab(tmp_path):
    case_ids, split, bounds = write_whole_ct_slabs(CT, SEG, NAMES, tmp_path, STRUCTURES)
    ct = sitk.ReadImage(str(CT))
    depth = ct.GetSize()[2]
    # every axial slice of the CT is in exactly one slab, in order, and each slab file holds
    # exactly its slices of the CT
    assert [z for slices in bounds for z in slices] == list(range(depth))
    assert len(case_ids) == len(bounds) == len(set(case_ids))
    ct_array = sitk.GetArrayViewFromImage(ct)
    for case_id, slices in zip(case_ids, bounds, strict=True):
        slab = sitk.ReadImage(str(tmp_path / "images" / f"{case_id}.nii.gz"))
        assert slab.GetOrigin() == ct.TransformIndexToPhysicalPoint((0, 0, slices.start))
        expected = ct_array[slices.start : slices.stop]
        assert np.array_equal(sitk.GetArrayViewFromImage(slab), expected)
    # split by slab: no slab in two parts, every slab in one; students train on training slabs
    parts = [set(split[part]) for part in ("train", "val", "test")]
    assert sum(len(p) for p in parts) == len(set().union(*parts)) == len(case_ids)
    assert set(split["student_train"]) < set(split["train"])
    # slabs without the structures (negatives) are in every part, as are slabs with them
    has = {c: slab_has_structures(tmp_path / "labels" / f"{c}.nii.gz") for c in case_ids}
    assert not all(has.values())
    for part in ("train", "val", "test", "student_train"):
        assert {has[c] for c in split[part]} == {True, False}, part
    # the negatives include the pelvis: the lowest slab has none of the structures
    assert not has[case_ids[0]]


def test_demo_needs_both_ct_and_labels(tmp_path, capsys):
    assert main(["demo", "--quick", "--ct", "x.nii.gz", "--output", str(tmp_path)]) == 2
    assert "--labels" in capsys.readouterr().err
