"""bench/kd_evidence/cohort_digest.py: a cohort written again (compressed at another time) has
the same digest; one voxel changed, or an image missing, gives another, and --check says so."""

from __future__ import annotations

import time

import pytest
import SimpleITK as sitk
from helpers import load_bench_script


@pytest.fixture(scope="module")
def digest():
    return load_bench_script("kd_evidence/cohort_digest.py", "cohort_digest_bench")


def write_cohort(root, voxel_value: int = 1):
    for folder, pixel in (("imagesTr", sitk.sitkInt16), ("labelsTr", sitk.sitkUInt8)):
        (root / folder).mkdir(parents=True)
        for case in ("synth_000", "synth_001"):
            image = sitk.Image([6, 5, 4], pixel)
            image.SetSpacing((1.5, 1.5, 3.0))
            image[2, 2, 2] = voxel_value if case == "synth_001" else 1
            sitk.WriteImage(image, str(root / folder / f"{case}.nii.gz"), useCompression=True)
    return root


def test_the_same_voxels_give_the_same_digest(digest, tmp_path, capsys):
    first = digest.cohort_digest(write_cohort(tmp_path / "a"))
    time.sleep(1.1)  # gzip stores the time of writing: the files' bytes differ, not the voxels
    assert digest.cohort_digest(write_cohort(tmp_path / "b")) == first
    assert digest.main([str(tmp_path / "b"), "--check", first]) == 0
    changed = write_cohort(tmp_path / "c", voxel_value=2)
    assert digest.cohort_digest(changed) != first
    assert digest.main([str(changed), "--check", first]) == 1
    assert "is not the cohort the teachers were trained on" in capsys.readouterr().err
    (changed / "labelsTr" / "synth_001.nii.gz").unlink()
    assert digest.cohort_digest(changed) != first
    with pytest.raises(SystemExit, match="no images"):
        digest.cohort_digest(tmp_path / "empty")
