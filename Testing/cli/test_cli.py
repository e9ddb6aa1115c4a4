"""The ``mtkd`` command: segment, evaluate, taps, train/distill with SIGINT and --resume."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import torch
import yaml
from helpers import write_dicom_series

from mtkd.cli import main
from mtkd.run_folder import read_events


@pytest.fixture(scope="module")
def oblique_ct(data_dir, tmp_path_factory):
    """A real CT crop with a non-identity direction, odd spacing and shifted origin."""
    image = sitk.ReadImage(str(data_dir / "abdomen_ct.nii.gz"))
    image = sitk.RegionOfInterest(image, [90, 80, 24], [16, 10, 76])
    angle = 0.25
    direction = np.array(
        [[np.cos(angle), 0, -np.sin(angle)], [0, 1, 0], [np.sin(angle), 0, np.cos(angle)]]
    ) @ np.array(image.GetDirection()).reshape(3, 3)
    image.SetDirection(direction.flatten().tolist())
    image.SetSpacing((2.7, 3.1, 3.4))
    image.SetOrigin((-11.0, 22.0, 300.5))
    path = tmp_path_factory.mktemp("ct") / "oblique_ct.nrrd"
    sitk.WriteImage(image, str(path))
    return path, image


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing())
        and np.allclose(a.GetOrigin(), b.GetOrigin())
        and np.allclose(a.GetDirection(), b.GetDirection())
    )


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".seg.nrrd"])
def test_segment_writes_on_the_input_grid(teacher_run, oblique_ct, tmp_path, suffix, capsys):
    path, image = oblique_ct
    output = tmp_path / f"out{suffix}"
    assert main(["segment", str(teacher_run), str(path), "-o", str(output), "--device", "cpu"]) == 0
    assert str(output) in capsys.readouterr().out
    if suffix == ".seg.nrrd":
        segmentation = slicerio.read_segmentation(str(output))
        names = [segment["name"] for segment in segmentation["segments"]]
        assert names == ["liver", "spleen", "kidney_right"]
        assert [s["labelValue"] for s in segmentation["segments"]] == [1, 2, 3]
        assert all(len(s["color"]) == 3 for s in segmentation["segments"])
    labelmap = sitk.ReadImage(str(output))
    assert same_grid(labelmap, image)
    assert set(np.unique(sitk.GetArrayViewFromImage(labelmap))) <= {0, 1, 2, 3}


def test_segment_several_images_and_a_dicom_series(teacher_run, oblique_ct, tmp_path):
    path, image = oblique_ct
    series = tmp_path / "dicom"
    series.mkdir()
    write_dicom_series(image, series, "1.2.826.0.1.3680043.8.498.77")
    out = tmp_path / "outputs"
    assert main(["segment", str(teacher_run), str(path), str(series), "-o", str(out) + "/"]) == 0
    from_dicom = sitk.ReadImage(str(out / "dicom.seg.nrrd"))
    from_nrrd = sitk.ReadImage(str(out / "oblique_ct.seg.nrrd"))
    assert from_dicom.GetSize() == image.GetSize()
    np.testing.assert_allclose(from_dicom.GetOrigin(), image.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(from_dicom.GetDirection(), image.GetDirection(), atol=1e-4)
    agree = (sitk.GetArrayViewFromImage(from_dicom) == sitk.GetArrayViewFromImage(from_nrrd)).mean()
    assert agree > 0.99


def test_evaluate_writes_per_volume_scores(teacher_run, slab_dataset, data_dir, tmp_path, capsys):
    folder, split = slab_dataset
    out = tmp_path / "scores.csv"
    args = [
        "evaluate",
        str(teacher_run),
        str(folder),
        "--labels-json",
        str(data_dir / "labels_total_v2.json"),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*args, "--split", str(teacher_run / "split.json"), "--csv", str(out)]) == 0
    # no deprecated MONAI argument (get_mask_edges(always_return_as_numpy=...)) per case
    assert not [w for w in caught if "deprecat" in str(w.message).lower()]
    rows = list(csv.DictReader(out.open()))
    assert {r["case"] for r in rows} == set(split["test"])
    assert {r["structure"] for r in rows} == {"liver", "spleen", "kidney_right"}
    dice = [float(r["dice"]) for r in rows if r["dice"] != "n/a"]
    assert dice and all(0.0 <= d <= 1.0 for d in dice)
    assert {r["outcome"] for r in rows} <= {"found", "missed", "spurious", "absent"}
    assert all(r["hd95_mm"] != "inf" for r in rows)  # a miss scores the penalty distance
    printed = capsys.readouterr().out
    assert "HD95" in printed and "kidney_right" in printed
    table = printed.splitlines()
    assert table[1].split()[-1] == "missed"
    mean = next(line for line in table if line.startswith("mean ")).split()
    missed = sum(r["outcome"] == "missed" for r in rows)
    spurious = sum(r["outcome"] == "spurious" for r in rows)
    expected = [str(missed)] + ([f"+{spurious}", "spurious"] if spurious else [])
    assert mean[3:] == expected


def test_taps_lists_names_and_shapes(capsys):
    assert main(["taps", "thesis_s1", "--input-size", "64", "64", "--in-channels", "3"]) == 0
    printed = capsys.readouterr().out
    line = next(
        row for row in printed.splitlines() if row.split()[1:2] == ["enc2"] or " enc2 " in row
    )
    assert "(1, 32, 32, 32)" in line
    assert any("bottleneck" in row and "(1, 64, 16, 16)" in row for row in printed.splitlines())


@pytest.mark.parametrize(
    ("make_input", "problem"),
    [
        (lambda p: p / "missing.nii.gz", "not found"),
        (lambda p: _write(p / "flat.nrrd", sitk.Image([20, 20], sitk.sitkInt16)), "3-D"),
        (lambda p: _write_nan(p / "nan.nii.gz"), "NaN"),
    ],
)
def test_bad_images_fail_clearly(teacher_run, tmp_path, capsys, make_input, problem):
    path = make_input(tmp_path)
    output = tmp_path / "out.nii.gz"
    assert main(["segment", str(teacher_run), str(path), "-o", str(output)]) == 2
    message = capsys.readouterr().err
    assert str(path) in message and problem in message
    assert not output.exists()


def _write(path, image):
    sitk.WriteImage(image, str(path))
    return path


def _write_nan(path):
    image = sitk.Image([16, 16, 8], sitk.sitkFloat32)
    image[3, 3, 3] = float("nan")
    return _write(path, image)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_saves_a_checkpoint_and_resume_finishes_identically(
    make_config, tmp_path, signum
):
    config = make_config("train", multitask={"reconstruction": "none"}, train__epochs=25)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "mtkd", "train", str(path), "--run-dir", str(run_dir)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if any(e["type"] == "metrics" for e in read_events(run_dir / "events.jsonl")):
            break
        time.sleep(0.05)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "--resume" in stderr
    assert "epoch 1/25" in stdout  # plain progress lines when not on a terminal
    events = read_events(run_dir / "events.jsonl")
    assert events[-1]["type"] == "status" and events[-1]["state"] == "interrupted"
    resumed = subprocess.run(
        [sys.executable, "-m", "mtkd", "train", "--resume", str(run_dir)],
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert main(["train", str(path), "--run-dir", str(tmp_path / "straight")]) == 0
    a = torch.load(run_dir / "model" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "straight" / "model" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((run_dir / "split.json").read_text()) == json.loads(
        (tmp_path / "straight" / "split.json").read_text()
    )
