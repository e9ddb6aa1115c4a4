"""`mtkd demo --quick`: the main job end to end on the bundled CT (two epochs per model)."""

from __future__ import annotations

import json

import slicerio

from mtkd.cli import main
from mtkd.demo import STRUCTURES


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
    segmentation = slicerio.read_segmentation(str(tmp_path / "abdomen_student.seg.nrrd"))
    assert [segment["name"] for segment in segmentation["segments"]] == STRUCTURES


def test_demo_needs_both_ct_and_labels(tmp_path, capsys):
    assert main(["demo", "--quick", "--ct", "x.nii.gz", "--output", str(tmp_path)]) == 2
    assert "--labels" in capsys.readouterr().err
