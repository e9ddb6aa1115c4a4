"""``mtkd segment`` on folders, ``mtkd compare`` and ``mtkd export`` from the command line, and
the bad inputs of inference: non-CT intensities, unwritable outputs, broken model sources, a
teacher at another spacing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import expect_error

from mtkd.cli import main
from mtkd.config import RunConfig
from mtkd.data.image_io import read_image
from mtkd.engine.trainer import Trainer


@pytest.fixture(scope="module")
def ct_folder(data_dir, tmp_path_factory):
    """Two real CT crops (NIfTI and NRRD) in one folder, plus a text file that is not an image."""
    folder = tmp_path_factory.mktemp("cts")
    image = sitk.ReadImage(str(data_dir / "abdomen_ct.nii.gz"))
    sitk.WriteImage(
        sitk.RegionOfInterest(image, [90, 80, 8], [16, 10, 70]), str(folder / "a.nii.gz")
    )
    sitk.WriteImage(sitk.RegionOfInterest(image, [80, 70, 6], [20, 15, 80]), str(folder / "b.nrrd"))
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_segment_a_folder_with_one_loaded_model(teacher_run, ct_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        ["segment", str(teacher_run), str(ct_folder), "-o", f"{out}/", "--format", "nii.gz"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    for name in ("a", "b"):
        result = sitk.ReadImage(str(out / f"{name}.nii.gz"))
        source = read_image(next(ct_folder.glob(f"{name}.*")))
        assert result.GetSize() == source.GetSize()
        assert np.allclose(result.GetOrigin(), source.GetOrigin())
        assert f"{name}.nii.gz" in printed
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz"]
    assert printed.count("whole volume") + printed.count("2-D slices") == 2  # the plan is shown


def test_segment_warns_about_non_ct_intensities(teacher_run, ct_folder, tmp_path, capsys):
    image = read_image(ct_folder / "a.nii.gz")
    scaled = sitk.RescaleIntensity(image, 0.0, 1.0)  # e.g. a normalised MR-like volume
    path = tmp_path / "scaled.nii.gz"
    sitk.WriteImage(scaled, str(path))
    assert main(["segment", str(teacher_run), str(path), "-o", str(tmp_path / "s.nii.gz")]) == 0
    error = capsys.readouterr().err
    assert "warning" in error and str(path) in error
    assert (tmp_path / "s.nii.gz").is_file()  # warned, not refused


def test_unwritable_output_fails_before_any_work(teacher_run, ct_folder, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    target = blocker / "out.seg.nrrd"  # a folder that cannot exist: its parent is a file
    code = main(["segment", str(teacher_run), str(ct_folder / "a.nii.gz"), "-o", str(target)])
    assert code == 2
    error = capsys.readouterr().err
    assert "cannot write output" in error and str(target) in error


def test_broken_model_sources_are_refused_clearly(ct_folder, tmp_path, capsys):
    image = str(ct_folder / "a.nii.gz")
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "metadata.json").write_text("{}")
    (bundle / "configs" / "inference.json").write_text("{}")
    assert main(["segment", str(bundle), image, "-o", str(tmp_path / "x.nii.gz")]) == 2
    assert "model.pt" in capsys.readouterr().err
    truncated = tmp_path / "model.ts"
    truncated.write_bytes(b"PK\x03\x04 truncated")
    assert main(["segment", str(truncated), image, "-o", str(tmp_path / "y.nii.gz")]) == 2
    assert str(truncated) in capsys.readouterr().err


def test_compare_on_the_command_line(teacher_run, data_dir, tmp_path, capsys):
    image = sitk.ReadImage(str(data_dir / "abdomen_ct.nii.gz"))
    labels = sitk.ReadImage(str(data_dir / "abdomen_seg_total_fast.nii.gz"))
    crop = ([100, 90, 20], [10, 5, 70])
    sitk.WriteImage(sitk.RegionOfInterest(image, *crop), str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(sitk.RegionOfInterest(labels, *crop), str(tmp_path / "ts.nii.gz"))
    names = str(data_dir / "labels_total_v2.json")
    out = tmp_path / "cmp"
    code = main(
        [
            "compare",
            str(tmp_path / "ct.nii.gz"),
            "--teacher",
            str(tmp_path / "ts.nii.gz"),
            "--teacher-labels",
            names,
            "--student",
            str(teacher_run),
            "--reference",
            str(tmp_path / "ts.nii.gz"),
            "--reference-labels",
            names,
            "-o",
            str(out),
            "--png",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    for name in ("comparison.json", "comparison.csv", "disagreement.seg.nrrd", "comparison.png"):
        assert (out / name).is_file() and str(out / name) in printed
    report = json.loads((out / "comparison.json").read_text())
    rows = {row["structure"]: row for row in report["structures"]}
    assert set(rows) == {"liver", "spleen", "kidney_right"}
    for row in rows.values():  # the teacher is the reference: both agreements are the same
        assert row["dice_teacher_student"] == pytest.approx(row["dice_student_reference"])


def test_export_on_the_command_line_then_segment_with_it(teacher_run, ct_folder, tmp_path, capsys):
    out = tmp_path / "ts"
    sample = str(ct_folder / "a.nii.gz")
    code = main(["export", str(teacher_run), "--format", "torchscript", "-o", str(out)])
    assert code == 0  # the sample defaults to a test case of the run
    assert "max |logit difference|" in capsys.readouterr().out
    metadata = json.loads((out / "mtkd_model.json").read_text())
    assert metadata["format"] == "torchscript"
    assert metadata["export_check"]["max_abs_diff"] <= metadata["export_check"]["bound"]
    assert main(["segment", str(out), sample, "-o", str(tmp_path / "seg.nii.gz")]) == 0
    ours = sitk.ReadImage(str(tmp_path / "seg.nii.gz"))
    assert main(["segment", str(teacher_run), sample, "-o", str(tmp_path / "ref.nii.gz")]) == 0
    reference = sitk.ReadImage(str(tmp_path / "ref.nii.gz"))
    agree = np.mean(sitk.GetArrayViewFromImage(ours) == sitk.GetArrayViewFromImage(reference))
    assert agree > 0.999


def test_teacher_at_another_spacing_is_refused(make_config, teacher_run, tmp_path):
    config = make_config(
        "distill",
        name="wrong-spacing",
        model={"name": "thesis_unet", "params": {"channels": [4, 8], "bottleneck": 16}},
        distill={"teacher": str(teacher_run), "preset": "thesis"},
    )
    config["data"]["spacing"] = [6.0, 6.0, 3.0]  # the teacher kept the CT's own spacing
    with expect_error(teacher_run / "model", "spacing"):
        Trainer(RunConfig.from_dict(config), tmp_path / "run", progress=False).run()
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
