"""HD95 that can be trusted: a missed structure scores a penalty instead of vanishing from the
mean, the missed count is reported, and MONAI's deprecated arguments are not used."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import load_bench_script
from scipy import ndimage

from mtkd.data.image_io import read_image, read_label
from mtkd.data.labels import LabelTable
from mtkd.infer.evaluate import score_arrays, summarise, summary_table, write_scores_csv
from mtkd.metrics import hd95_per_structure, image_diagonal_mm, outcomes_per_structure

NAMES = ["liver", "spleen", "kidney_right"]


@pytest.fixture(scope="module")
def case(data_dir):
    """The bundled CT's grid and a reference (liver 1, spleen 2, kidney_right 3) taken from
    its TotalSegmentator map, with the spacing in array axis order (z, y, x)."""
    image = read_image(data_dir / "abdomen_ct.nii.gz")
    total = sitk.GetArrayFromImage(read_label(data_dir / "abdomen_seg_total_fast.nii.gz", image))
    table = LabelTable.from_json(data_dir / "labels_total_v2.json")
    reference = np.zeros(total.shape, np.uint8)
    for value, name in enumerate(NAMES, start=1):
        reference[total == table.value_of(name)] = value
    assert all((reference == value).sum() > 100 for value in (1, 2, 3))
    return image, reference, tuple(reversed(image.GetSpacing()))


def diagonal(image: sitk.Image) -> float:
    """The image box's diagonal in mm, computed here from SimpleITK's size and spacing."""
    extent = np.array(image.GetSize()) * np.array(image.GetSpacing())
    return float(np.linalg.norm(extent))


def shifted(labels: np.ndarray, voxels: int, axis: int = 2) -> np.ndarray:
    """Every structure moved by ``voxels`` along ``axis`` (an imperfect segmentation)."""
    return np.roll(labels, voxels, axis=axis)


def without(labels: np.ndarray, *values: int) -> np.ndarray:
    out = labels.copy()
    out[np.isin(out, values)] = 0
    return out


def test_a_missed_structure_scores_the_image_diagonal(case) -> None:
    image, reference, spacing = case
    prediction = without(shifted(reference, 1), 2)  # spleen missed entirely
    scores = score_arrays("ct", prediction, reference, NAMES, spacing)
    by_name = {s.structure: s for s in scores}
    expected = diagonal(image)
    assert expected == pytest.approx(image_diagonal_mm(reference.shape, spacing))
    assert by_name["spleen"].hd95_mm == pytest.approx(expected)
    assert by_name["spleen"].outcome == "missed" and by_name["spleen"].dice == 0.0
    for name in ("liver", "kidney_right"):
        assert by_name[name].outcome == "found"
        assert 0 < by_name[name].hd95_mm < 10  # a one-voxel shift, 3 mm voxels
    # the penalty exceeds any distance two voxels of the image can have
    corner = np.zeros_like(reference)
    corner[-1, -1, -1] = 1
    first = np.zeros_like(reference)
    first[0, 0, 0] = 1
    [farthest] = hd95_per_structure(corner, first, 1, spacing)
    assert farthest < expected


def test_a_spurious_structure_scores_the_penalty_too(case) -> None:
    """Predicted where the reference has none: Dice 0, HD95 the penalty, counted apart."""
    image, reference, spacing = case
    scores = score_arrays("ct", reference, without(reference, 3), NAMES, spacing)
    kidney = scores[2]
    assert (kidney.outcome, kidney.dice) == ("spurious", 0.0)
    assert kidney.hd95_mm == pytest.approx(diagonal(image))
    nothing = np.zeros_like(reference)
    both_empty = score_arrays("ct", nothing, nothing, NAMES, spacing)
    assert all(s.outcome == "absent" and math.isnan(s.hd95_mm) for s in both_empty)
    assert outcomes_per_structure(reference, without(reference, 3), 3) == [
        "found",
        "found",
        "spurious",
    ]


def test_missing_more_structures_never_gives_a_better_mean_hd95(case, tmp_path) -> None:
    """Model A segments all three structures imperfectly (shifted 6 voxels = 18 mm); model B
    places the liver almost exactly but misses spleen and kidney. Left out of the mean, B's
    two misses made it look several times better than A."""
    image, reference, spacing = case
    a = summarise(score_arrays("ct", shifted(reference, 6), reference, NAMES, spacing))
    b = summarise(
        score_arrays("ct", without(shifted(reference, 1), 2, 3), reference, NAMES, spacing)
    )
    assert (a["mean"]["missed"], b["mean"]["missed"]) == (0, 2)
    assert b["liver"]["hd95_mm"] < a["liver"]["hd95_mm"]  # B's one structure is better...
    assert b["mean"]["hd95_mm"] > a["mean"]["hd95_mm"]  # ...but its misses count
    penalty = diagonal(image)
    assert b["mean"]["hd95_mm"] == pytest.approx((b["liver"]["hd95_mm"] + 2 * penalty) / 3)
    # two volumes: the counts add up per structure and in the mean
    second = summarise(
        score_arrays("a", without(reference, 2), reference, NAMES, spacing)
        + score_arrays("b", without(reference, 2, 3), reference, NAMES, spacing)
    )
    assert (second["spleen"]["missed"], second["kidney_right"]["missed"]) == (2, 1)
    assert (second["mean"]["missed"], second["mean"]["spurious"]) == (3, 0)
    assert second["spleen"]["hd95_mm"] == pytest.approx(penalty)


def test_the_missed_count_is_printed_and_written(case, tmp_path) -> None:
    _, reference, spacing = case
    scores = score_arrays("ct", without(reference, 2), reference, NAMES, spacing)
    scores += score_arrays("ct2", without(reference, 2), without(reference, 3), NAMES, spacing)
    table = summary_table(summarise(scores)).splitlines()
    assert table[0].split() == ["structure", "Dice", "HD95", "(mm)", "missed"]
    rows = {line.split()[0]: line.split() for line in table[2:6]}
    assert rows["spleen"][-1] == "2" and rows["liver"][-1] == "0"
    assert rows["mean"][-3:] == ["2", "+1", "spurious"]
    assert "image's diagonal in mm" in table[-1]
    path = tmp_path / "scores.csv"
    write_scores_csv(scores, path)
    lines = path.read_text().splitlines()
    assert lines[0].split(",")[-1] == "outcome"
    assert [line.split(",")[-1] for line in lines[1:]] == [
        "found",
        "missed",
        "found",
        "found",
        "missed",
        "spurious",
    ]


def test_no_deprecation_warning_from_our_hd95(case) -> None:
    """MONAI 1.5+ warns when ``get_mask_edges(always_return_as_numpy=...)`` is passed (MONAI's
    own compute_hausdorff_distance does): our HD95 must not trigger it, nor any other
    deprecation."""
    _, reference, spacing = case
    prediction = shifted(reference, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distances = hd95_per_structure(prediction, reference, 3, spacing)
    assert all(0 < d < 10 for d in distances)
    deprecations = [
        f"{w.filename}:{w.lineno}: {w.message}"
        for w in caught
        if issubclass(w.category, (FutureWarning, DeprecationWarning))
        or "always_return_as_numpy" in str(w.message)
    ]
    assert deprecations == []


def test_hd95_matches_an_independent_computation(case) -> None:
    """The MONAI edge/distance calls give the symmetric 95th percentile of surface distances."""
    _, reference, spacing = case
    prediction = shifted(reference, 3, axis=1)
    for value, distance in enumerate(hd95_per_structure(prediction, reference, 3, spacing), 1):
        a, b = prediction == value, reference == value
        edge_a, edge_b = a & ~ndimage.binary_erosion(a), b & ~ndimage.binary_erosion(b)
        to_b = ndimage.distance_transform_edt(~edge_b, sampling=spacing)[edge_a]
        to_a = ndimage.distance_transform_edt(~edge_a, sampling=spacing)[edge_b]
        expected = max(np.percentile(to_b, 95), np.percentile(to_a, 95))
        assert distance == pytest.approx(expected, abs=1e-3)


def load_penalised_hd95():
    return load_bench_script("ablation/penalised_hd95.py", "penalised_hd95")


def test_bounds_recomputed_from_old_results_hold_the_penalised_mean(case) -> None:
    """bench/ablation/penalised_hd95.py bounds the penalised mean HD95 from what an old
    results.csv row kept (per structure: Dice, and HD95 over the found volumes only)."""
    image, reference, spacing = case
    predictions = [shifted(reference, k % 3) for k in range(6)]
    predictions = [without(p, 3) for p in predictions]  # kidney missed in every volume
    predictions[1] = without(predictions[1], 2)  # spleen missed in two volumes
    predictions[4] = without(predictions[4], 2)
    scores = [
        s
        for i, p in enumerate(predictions)
        for s in score_arrays(str(i), p, reference, NAMES, spacing)
    ]
    truth = summarise(scores)["mean"]
    row = {"cell": "kd", "hd95_mm": "0"}
    for name in NAMES:
        own = [s for s in scores if s.structure == name]
        found = [s.hd95_mm for s in own if s.outcome == "found"]
        row[f"dice_{name}"] = str(np.mean([s.dice for s in own]))
        row[f"hd95_mm_{name}"] = str(np.mean(found)) if found else "nan"
    bounds = load_penalised_hd95().run_bounds(row, 6, diagonal(image))
    assert (truth["missed"], bounds["known_missed"]) == (8, 6)
    assert bounds["low"] <= truth["hd95_mm"] + 1e-6 <= bounds["high"] + 2e-6
    assert bounds["low"] < truth["hd95_mm"]  # the spleen's two misses are not known
