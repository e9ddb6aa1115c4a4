"""`mtkd synth`: synthetic abdominal phantoms written as an MSD cohort."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from mtkd.cli import main
from mtkd.data.cohort import COHORT_NAME, write_cohort
from mtkd.data.datasets import load_dataset
from mtkd.data.image_io import read_image, read_label
from mtkd.data.synth import LABELS, NOISE_HU, NOMINAL_HU, make_subject
from mtkd.errors import MTKDError

SUBJECTS = 3


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth") / "cohort"
    write_cohort(folder, SUBJECTS, seed=7)
    return folder


def _arrays(case):
    image = read_image(case.image)
    label = read_label(case.label, reference=image)  # raises unless on the same grid
    return sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label)


def test_cohort_loads_as_msd_with_patients(cohort):
    dataset = load_dataset(cohort)
    assert dataset.layout == "msd"
    assert len(dataset.cases) == SUBJECTS
    assert [case.patient_id for case in dataset.cases] == [f"synth_{i:03d}" for i in range(3)]
    assert all(case.image.name.startswith("synth_") for case in dataset.cases)
    assert dataset.labels.to_dict() == {str(k): v for k, v in LABELS.items()}
    data = json.loads((cohort / "dataset.json").read_text())
    assert data["name"] == COHORT_NAME and data["numTraining"] == SUBJECTS
    assert "SYNTHETIC" in data["name"] and "SYNTHETIC" in data["description"]
    assert data["training"][0] == {
        "image": "./imagesTr/synth_000.nii.gz",
        "label": "./labelsTr/synth_000.nii.gz",
        "patient": "synth_000",
    }


def test_every_structure_present_with_its_hounsfield_units(cohort):
    dataset = load_dataset(cohort)
    base = json.loads((cohort / "dataset.json").read_text())["mtkd_synth"]["base_hu"]
    for case in dataset.cases:
        image, label = _arrays(case)
        assert image.shape == label.shape == (48, 96, 96)
        assert set(np.unique(label)) == {0, *LABELS}
        assert image.min() >= -1024 and (image == image.min()).mean() < 0.5  # air, not all air
        assert image.max() >= 300  # bone
        for value, name in LABELS.items():
            interior = ndimage.binary_erosion(label == value, iterations=2)
            assert interior.sum() >= 20, (case.case_id, name)
            mean = float(image[interior].mean())
            assert abs(mean - base[case.case_id][name]) < 12, (case.case_id, name, mean)
            if name in NOMINAL_HU:
                assert abs(mean - NOMINAL_HU[name]) < 20, (case.case_id, name, mean)
            else:  # the aorta's value is drawn per subject
                assert 30 < mean < 210
            # noise of about NOISE_HU (plus a little texture) inside the organ
            assert 0.6 * NOISE_HU < float(image[interior].std()) < 2.5 * NOISE_HU


def test_kidney_cortex_brighter_than_medulla():
    for index in range(2):
        subject = make_subject(3, index)
        for value in (3, 4):
            mask = subject.label == value
            # the second layer inside the surface (cortex, little blur from outside) vs the core
            layer = ndimage.binary_erosion(mask) & ~ndimage.binary_erosion(mask, iterations=2)
            core = ndimage.binary_erosion(mask, iterations=3)
            assert subject.image[layer].mean() > subject.image[core].mean() + 5


def test_subjects_differ(cohort):
    cases = load_dataset(cohort).cases
    labels = [_arrays(case)[1] for case in cases]
    for value in LABELS:
        volumes = [int((label == value).sum()) for label in labels]
        centroids = [np.argwhere(label == value).mean(axis=0) for label in labels]
        assert len(set(volumes)) == len(volumes)
        for i in range(len(cases)):
            for j in range(i + 1, len(cases)):
                assert np.abs(centroids[i] - centroids[j]).max() > 0.1


def test_same_seed_reproduces_exactly_and_other_seed_differs(cohort, tmp_path):
    again = write_cohort(tmp_path / "again", 2, seed=7).parent
    other = write_cohort(tmp_path / "other", 2, seed=8).parent
    first, second, third = (load_dataset(f).cases for f in (cohort, again, other))
    for a, b, c in zip(first, second, third):
        image_a, label_a = _arrays(a)
        image_b, label_b = _arrays(b)
        image_c, label_c = _arrays(c)
        assert image_a.tobytes() == image_b.tobytes() and image_a.dtype == image_b.dtype
        assert label_a.tobytes() == label_b.tobytes()
        assert not np.array_equal(image_a, image_c) and not np.array_equal(label_a, label_c)


def test_other_grid_and_spacing(tmp_path):
    subject = make_subject(0, 0, size=(48, 40, 16), spacing=(6.0, 7.0, 9.0))
    assert subject.image.shape == subject.label.shape == (16, 40, 48)
    assert set(np.unique(subject.label)) == {0, *LABELS}
    image, _ = subject.images()
    assert image.GetSpacing() == (6.0, 7.0, 9.0)
    with pytest.raises(MTKDError, match="too small"):
        make_subject(0, 0, size=(8, 8, 8))


def test_cli_writes_cohort_and_refuses_foreign_folder(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["synth", str(out), "--subjects", "2", "--seed", "1", "--size", "48", "48", "16"]
    assert main([*argv, "--spacing", "6", "6", "9"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "SYNTHETIC" in printed
    assert "SYNTHETIC" in (out / "dataset.json").read_text()
    assert len(load_dataset(out).cases) == 2
    # rewriting a synthetic cohort is allowed; files of the larger earlier cohort go
    assert main([*argv[:3], "1", *argv[4:]]) == 0
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["synth_000.nii.gz"]
    assert len(load_dataset(out).cases) == 1
    # a non-empty folder that is not a synthetic cohort is refused, and left untouched
    foreign = tmp_path / "real"
    foreign.mkdir()
    (foreign / "dataset.json").write_text('{"name": "real data", "training": []}')
    assert main(["synth", str(foreign), "--subjects", "1"]) == 2
    assert "not a synthetic cohort" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["dataset.json"]
    with pytest.raises(MTKDError, match="at least 1"):
        write_cohort(tmp_path / "none", 0)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--size", "32", "32", "16"], "at least 48x40x16"),
        (["--size", "47", "40", "16"], "at least 48x40x16"),
        (["--size", "48", "39", "16"], "at least 48x40x16"),
        (["--size", "48", "40", "15"], "at least 48x40x16"),
        (["--size", "100000", "100000", "100000"], "at most 16,777,216 voxels"),
        (["--size", "4096", "4096", "2"], "at least"),
        (["--size", "1024", "1024", "17"], "at most 16,777,216 voxels"),
        (["--spacing", "1e308", "1e308", "1e308"], "between 0.01 and 100.0 mm"),
        (["--spacing", "nan", "3", "3"], "between 0.01 and 100.0 mm"),
        (["--seed", "-1"], "--seed"),
    ],
)
def test_cli_refuses_a_grid_it_cannot_draw_before_drawing(tmp_path, capsys, options, words):
    """A grid too small for the structures, too large for memory, or a spacing or seed the
    drawing cannot use: one line naming the limit, before anything is drawn or written."""
    out = tmp_path / "cohort"
    assert main(["synth", str(out), "--subjects", "1", *options]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("mtkd: error:") and "\n" not in error and words in error, error
    assert not out.exists()


def test_every_subject_draws_at_the_smallest_grid():
    """The smallest grid the check accepts draws every structure, for every seed tried."""
    for seed in range(6):
        for index in range(3):
            subject = make_subject(seed, index, size=(48, 40, 16))
            assert set(np.unique(subject.label)) == {0, *LABELS}
