"""The same seed gives bit-identical results on the CPU: training, distillation and inference,
each run twice in its own process (so no state carries over inside one interpreter)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml


def run_mtkd(*args: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mtkd", *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]


def weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model" / "model.pt", weights_only=True)


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.slow
def test_distillation_is_bit_identical_for_a_seed(teacher_run, make_config, tmp_path):
    """Masked-reconstruction teacher, InfoNCE pairs and PMD with augmentation on: two runs of
    one config in two processes give the same weights; another seed does not."""
    config = make_config(
        "distill",
        model={"name": "thesis_s1", "params": {}},
        train_on="student_train",
        distill={"teacher": str(teacher_run), "preset": "thesis"},
    )
    config["data"]["augment"] = {"flip_prob": 0.5, "prob": 0.5}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    for name in ("first", "second"):
        run_mtkd("distill", str(path), "--run-dir", str(tmp_path / name))
    assert identical(weights(tmp_path / "first"), weights(tmp_path / "second"))

    config["train"]["seed"] = 1
    path.write_text(yaml.safe_dump(config))
    run_mtkd("distill", str(path), "--run-dir", str(tmp_path / "other-seed"))
    assert not identical(weights(tmp_path / "first"), weights(tmp_path / "other-seed"))


def test_inference_is_bit_identical(teacher_run, data_dir, tmp_path):
    image = sitk.ReadImage(str(data_dir / "abdomen_ct.nii.gz"))
    crop = sitk.RegionOfInterest(image, [80, 70, 20], [20, 15, 70])
    ct = tmp_path / "ct.nii.gz"
    sitk.WriteImage(crop, str(ct))
    outputs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.nii.gz"
        run_mtkd("segment", str(teacher_run), str(ct), "-o", str(out), "--device", "cpu")
        outputs.append(sitk.GetArrayFromImage(sitk.ReadImage(str(out))))
    assert np.count_nonzero(outputs[0]) > 0
    assert np.array_equal(outputs[0], outputs[1])
