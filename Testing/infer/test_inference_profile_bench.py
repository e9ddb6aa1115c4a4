"""bench/inference_profile.py on a small real CT: one file-to-file segmentation profiled, the
stages from reading to writing present, and its table."""

from __future__ import annotations

import SimpleITK as sitk
from conftest import DATA
from helpers import load_bench_script, untrained_model

from mtkd.infer.predictor import Predictor
from mtkd.modelfiles.model_io import load_model


def test_a_profile_covers_the_file_to_file_segmentation(tmp_path):
    bench = load_bench_script("inference_profile.py", "inference_profile_bench")
    image = sitk.ReadImage(str(DATA / "abdomen_ct.nii.gz"))
    ct = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk.RegionOfInterest(image, [64, 64, 20], [30, 20, 40]), str(ct))
    predictor = Predictor(load_model(untrained_model(tmp_path / "model", seed=0)), "cpu")
    result = bench.profile_volume(predictor, ct, tmp_path, repeats=1)
    stages = result["stages_s"]
    assert {"read", "network", "to SimpleITK", "write"} <= set(stages), stages
    assert list(stages)[0] == "read"  # in the pipeline's order
    assert result["size"] == [64, 64, 20] and result["plan"].startswith("2-D slices")
    assert (tmp_path / "ct.seg.nrrd").is_file()
    report = {"machine": "test", "date": "today", "repeats": 1, "backend": "torch",
              "results": [result]}  # fmt: skip
    table = bench.markdown(report)
    assert "| network |" in table and "ct.nii.gz (64×64×20" in table
