"""`mtkd segment --memory-limit`: the plan shrinks to the limit, the labels stay the same."""

from __future__ import annotations

import re

import numpy as np
import SimpleITK as sitk
from helpers import untrained_model

from mtkd.cli import main


def test_a_memory_limit_shrinks_the_batches_not_the_labels(data_dir, tmp_path, capsys):
    image = sitk.ReadImage(str(data_dir / "abdomen_ct.nii.gz"))
    ct = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk.RegionOfInterest(image, [96, 80, 40], [20, 10, 30]), str(ct))
    model = str(untrained_model(tmp_path / "model", names=("liver", "spleen")))
    batches, labels = {}, {}
    for name, extra in (("default", []), ("limited", ["--memory-limit", "0.05"])):
        output = tmp_path / f"{name}.nii.gz"
        assert main(["segment", model, str(ct), "-o", str(output), *extra]) == 0
        said = capsys.readouterr().out
        batches[name] = int(re.search(r"(\d+) slices per batch", said).group(1))
        labels[name] = sitk.GetArrayFromImage(sitk.ReadImage(str(output)))
    assert batches["limited"] < batches["default"]
    np.testing.assert_array_equal(labels["limited"], labels["default"])


def test_a_limit_that_is_not_positive_is_refused_before_loading(tmp_path, capsys):
    code = main(["segment", str(tmp_path / "absent"), str(tmp_path / "ct.nii.gz"), "-o",
                 str(tmp_path / "out.nii.gz"), "--memory-limit", "0"])  # fmt: skip
    assert code == 2
    assert "--memory-limit must be a positive number of MiB" in capsys.readouterr().err
