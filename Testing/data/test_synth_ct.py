"""`mtkd synth --style ct`: the harder, CT-like synthetic cohort (mtkd.data.synth_ct)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from mtkd.cli import main
from mtkd.data.cohort import write_cohort
from mtkd.data.datasets import load_dataset
from mtkd.data.image_io import read_image, read_label
from mtkd.data.synth import LABELS
from mtkd.data.synth_ct import PHASES, TISSUES, make_ct_subject
from mtkd.errors import MTKDError

SMALL = (64, 64, 32)  # fast; the anatomy scales with the grid
STOMACH, PSOAS = 6, 7
assert TISSUES[STOMACH] == "stomach" and TISSUES[PSOAS] == "psoas"


@pytest.fixture(scope="module")
def subjects():
    """Twelve subjects: seeds 0..3, three subjects each, at the default difficulty."""
    return [make_ct_subject(seed, index, SMALL) for seed in range(4) for index in range(3)]


def _border(image, a, b):
    """HU on each side of the face-adjacent voxel pairs (one in mask ``a``, one in ``b``)."""
    side_a, side_b = [], []
    for axis in range(3):
        img, ma, mb = (np.moveaxis(v, axis, 0) for v in (image, a, b))
        for first, second in ((slice(None, -1), slice(1, None)), (slice(1, None), slice(None, -1))):
            pair = ma[first] & mb[second]
            side_a.append(img[first][pair])
            side_b.append(img[second][pair])
    return np.concatenate(side_a).astype(float), np.concatenate(side_b).astype(float)


def test_same_seed_gives_identical_bytes_and_another_seed_differs():
    first, again = make_ct_subject(5, 1, SMALL), make_ct_subject(5, 1, SMALL)
    for name in ("image", "label", "tissue", "lesions"):
        assert getattr(first, name).tobytes() == getattr(again, name).tobytes(), name
    assert first.image.dtype == np.int16 and first.label.dtype == np.uint8
    assert first.spacing == again.spacing and first.info == again.info
    other = make_ct_subject(6, 1, SMALL)
    assert not np.array_equal(first.image, other.image)
    assert not np.array_equal(first.label, other.label)


def test_every_structure_present_with_a_sane_size(subjects):
    for subject in subjects:
        assert subject.image.shape == subject.label.shape == (32, 64, 64)
        assert set(np.unique(subject.label)) == {0, *LABELS}
        assert set(np.unique(subject.tissue)) >= {0, STOMACH, PSOAS, 8}  # + IVC
        percent = {name: 100 * float((subject.label == v).mean()) for v, name in LABELS.items()}
        assert 0.8 < percent["liver"] < 12, percent
        for name in ("spleen", "kidney_left", "kidney_right", "aorta"):
            assert 0.05 < percent[name] < percent["liver"], (name, percent)
        for value in LABELS:  # not only a rim: an interior after erosion
            assert ndimage.binary_erosion(subject.label == value).sum() >= 20
        assert not np.any((subject.label > 0) & (subject.tissue > 0) & (subject.tissue != 9))
        assert subject.image.min() <= -900 and subject.image.max() >= 300  # air, bone


def test_every_structure_at_the_smallest_grid():
    for seed in range(3):
        for index in range(2):
            subject = make_ct_subject(seed, index, size=(48, 40, 16))
            assert set(np.unique(subject.label)) == {0, *LABELS}


def test_organs_touch_neighbours_of_close_hounsfield_units(subjects):
    """Liver and stomach (unlabelled) share a border with a small HU step across it, far
    smaller than the liver's step to fat; kidneys touch the psoas."""
    for subject in subjects:
        liver, stomach = subject.label == 1, subject.tissue == STOMACH
        inner, outer = _border(subject.image, liver, stomach)
        assert inner.size >= 15, "liver and stomach do not touch"
        step = abs(inner.mean() - outer.mean())
        assert step < 30, step
        fat = (subject.label == 0) & (subject.tissue == 0) & (subject.image < -50)
        liver_side, fat_side = _border(subject.image, liver, fat)
        if liver_side.size >= 10:
            assert liver_side.mean() - fat_side.mean() > step + 30
        kidneys = (subject.label == 3) | (subject.label == 4)
        assert _border(subject.image, kidneys, subject.tissue == PSOAS)[0].size >= 10
    touching = [_border(s.image, s.label == 2, s.tissue == STOMACH)[0].size for s in subjects]
    assert sum(size >= 10 for size in touching) >= len(subjects) // 2  # spleen and stomach


def test_retroperitoneal_fat_outlines_the_kidneys(subjects):
    """No bowel in the fat around the kidneys: for most kidneys the median HU 1-3 voxels
    outside them (where no organ, labelled or not, lies) is fat-like. Bowel there (about
    35 HU, as close to an unenhanced kidney) hid them in an earlier version (8 % of kidneys)."""
    medians = []
    for subject in subjects:
        for value in (3, 4):  # LABELS: kidney_left, kidney_right
            kidney = subject.label == value
            ring = ndimage.binary_dilation(kidney, iterations=3)
            ring &= ~ndimage.binary_dilation(kidney) & (subject.label == 0) & (subject.tissue == 0)
            medians.append(float(np.median(subject.image[ring])))
    assert np.mean(np.array(medians) < -20.0) >= 0.6, medians


def test_difficulty_sets_border_contrast_noise_and_lesions():
    def gaps(level):
        drawn = [make_ct_subject(0, index, (48, 40, 16), difficulty=level) for index in range(6)]
        gap = [abs(s.info["tissue_hu"]["stomach"] - s.hu["liver"]) for s in drawn]
        return gap, [s.info["noise_hu"] for s in drawn], [s.info["lesions"] for s in drawn]

    easy, hard = gaps(0.0), gaps(1.0)
    assert max(hard[0]) <= 6.01 and max(easy[0]) > 10
    assert np.mean(hard[1]) > np.mean(easy[1])
    for level in (-0.1, 1.5, float("nan"), "a"):
        with pytest.raises(MTKDError, match="difficulty"):
            make_ct_subject(0, 0, SMALL, difficulty=level)


def test_lesions_inside_organ_labels_and_differ_from_the_organ(subjects):
    for subject in subjects:
        lesions = subject.lesions
        assert lesions.sum() > 0 and subject.info["lesions"] >= 1
        assert np.all(subject.label[lesions] >= 1) and np.all(subject.label[lesions] <= 4)
        parts, count = ndimage.label(lesions & (subject.label == 1))
        assert count >= 1  # at least one in the liver
        for part in range(1, count + 1):  # each lesion's core stands out from the liver
            core = ndimage.binary_erosion(parts == part)
            if core.sum() >= 5:
                assert abs(np.median(subject.image[core]) - subject.hu["liver"]) > 8


def test_spacing_noise_and_phase_vary_per_subject(subjects):
    spacings = {s.spacing for s in subjects}
    assert len(spacings) == len(subjects)
    assert len({s.spacing[2] for s in subjects}) == len(subjects)  # slice thickness
    assert len({s.info["noise_hu"] for s in subjects}) == len(subjects)
    phases = {s.info["phase"] for s in subjects}
    assert phases == set(PHASES)
    image, label = subjects[0].images()
    assert image.GetSpacing() == label.GetSpacing() == subjects[0].spacing
    # the phase shifts the aorta's measured HU: arterial > portal-venous > non-contrast
    by_phase: dict[str, list[float]] = {phase: [] for phase in PHASES}
    for subject in subjects:
        core = ndimage.binary_erosion(subject.label == 5)
        by_phase[subject.info["phase"]].append(float(np.median(subject.image[core])))
    means = {phase: np.mean(values) for phase, values in by_phase.items()}
    assert means["arterial"] > means["portal-venous"] + 40 > means["non-contrast"] + 80, means
    # body size and position vary: the body's centroid and area differ per subject
    bodies = [(s.image > -500).sum() for s in subjects]
    assert len(set(bodies)) == len(subjects)


def test_cli_style_ct_writes_a_loadable_msd_cohort(tmp_path, capsys):
    out = tmp_path / "ct"
    argv = ["synth", str(out), "--subjects", "2", "--seed", "3", "--size", "48", "40", "16"]
    assert main([*argv, "--style", "ct", "--difficulty", "0.7"]) == 0
    assert "SYNTHETIC" in capsys.readouterr().out
    dataset = load_dataset(out)
    assert dataset.layout == "msd" and len(dataset.cases) == 2
    assert dataset.labels.to_dict() == {str(k): v for k, v in LABELS.items()}
    data = json.loads((out / "dataset.json").read_text())
    marker = data["mtkd_synth"]
    assert marker["style"] == "ct" and marker["difficulty"] == 0.7
    assert "SYNTHETIC" in data["description"] and "--style ct" in data["description"]
    for case in dataset.cases:
        image = read_image(case.image)
        label = sitk.GetArrayFromImage(read_label(case.label, reference=image))
        assert set(np.unique(label)) == {0, *LABELS}
        info = marker["subjects"][case.case_id]
        assert info["phase"] in PHASES
        assert np.allclose(image.GetSpacing(), info["spacing"])
        drawn = make_ct_subject(3, int(case.case_id[-3:]), (48, 40, 16), difficulty=0.7)
        assert np.array_equal(sitk.GetArrayFromImage(image), drawn.image)
    # an ellipsoid cohort (the default style) may be replaced by a ct one and back
    assert (
        main(argv) == 0
        and "style" not in json.loads((out / "dataset.json").read_text())["mtkd_synth"]
    )
    assert main([*argv, "--difficulty", "0.5"]) == 2  # ellipsoid has no difficulty
    assert "--style ct only" in capsys.readouterr().err
    assert main([*argv, "--style", "ct", "--difficulty", "2"]) == 2
    assert "--difficulty" in capsys.readouterr().err
    with pytest.raises(MTKDError, match="unknown phantom style"):
        write_cohort(tmp_path / "x", 1, style="mri")
