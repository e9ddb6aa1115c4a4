"""Teacher-versus-student comparison on the real abdomen CT: scores, files, picture, errors."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from conftest import DATA
from helpers import expect_error, read_with_slicer
from scipy import ndimage

from mtkd.data.image_io import read_image, read_label, write_image
from mtkd.data.labels import LabelTable
from mtkd.data.segnrrd import write_seg_nrrd
from mtkd.errors import MTKDError
from mtkd.infer.compare import compare
from mtkd.infer.comparison_files import write_comparison
from mtkd.infer.comparison_table import format_comparison
from mtkd.infer.picture import slice_panels, structure_colors, write_contour_png
from mtkd.infer.predictor import Predictor
from mtkd.infer.segmenters import ModelSegmenter, StoredSegmentation
from mtkd.modelfiles.model_io import load_model

CT = DATA / "abdomen_ct.nii.gz"
TOTAL = DATA / "abdomen_seg_total_fast.nii.gz"
COMMON = ["liver", "spleen", "kidney_right"]  # the student's order
FIELDS = [
    "structure",
    "dice_teacher_student",
    "hd95_teacher_student_mm",
    "dice_teacher_reference",
    "hd95_teacher_reference_mm",
    "dice_student_reference",
    "hd95_student_reference_mm",
    "volume_teacher_ml",
    "volume_student_ml",
    "volume_reference_ml",
    "teacher_only_ml",
    "student_only_ml",
]


@pytest.fixture(scope="module")
def ct() -> sitk.Image:
    return read_image(CT)


@pytest.fixture(scope="module")
def total_labels() -> LabelTable:
    return LabelTable.from_json(DATA / "labels_total_v2.json")


@pytest.fixture(scope="module")
def total(ct) -> np.ndarray:
    return sitk.GetArrayFromImage(read_label(TOTAL, reference=ct))


def mask_of(array: np.ndarray, table: LabelTable, name: str) -> np.ndarray:
    return array == table.value_of(name)


def as_image(array: np.ndarray, grid: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(grid)
    return image


@pytest.fixture(scope="module")
def model_run(teacher_run, ct, total, total_labels, tmp_path_factory):
    """TotalSegmentator's stored map as teacher, the tiny trained model as student, and a
    reference (liver eroded by one voxel = 1, spleen = 2, no kidney) read from a file."""
    model = load_model(teacher_run)
    student = ModelSegmenter(Predictor(model))
    teacher = StoredSegmentation(TOTAL, total_labels, name="TotalSegmentator")
    liver = ndimage.binary_erosion(mask_of(total, total_labels, "liver"))
    reference_array = np.zeros(total.shape, np.uint8)
    reference_array[liver] = 1
    reference_array[mask_of(total, total_labels, "spleen")] = 2
    folder = tmp_path_factory.mktemp("compare")
    reference_path = folder / "reference.nii.gz"
    write_image(as_image(reference_array, ct), reference_path)
    reference = read_label(reference_path, reference=ct)
    reference_labels = LabelTable({1: "liver", 2: "spleen"})
    result = compare(teacher, student, ct, reference, reference_labels)
    paths = write_comparison(result, folder / "out", ct, png=True)
    student_array = sitk.GetArrayFromImage(Predictor(model).predict(ct).labelmap)
    return {
        "model": model,
        "result": result,
        "paths": paths,
        "student": student_array,
        "reference": reference_array,
        "reference_labels": reference_labels,
    }


def hd95_independent(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Symmetric 95th-percentile surface distance from scipy distance transforms; the
    diagonal of the image's box where one mask is empty."""
    if not a.any() and not b.any():
        return math.nan
    if not a.any() or not b.any():
        return float(np.linalg.norm(np.array(a.shape) * np.array(spacing)))
    surface_a = a & ~ndimage.binary_erosion(a)
    surface_b = b & ~ndimage.binary_erosion(b)
    to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)[surface_a]
    to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing)[surface_b]
    return float(max(np.percentile(to_b, 95), np.percentile(to_a, 95)))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return math.nan if total == 0 else 2 * int((a & b).sum()) / total


def same(actual, expected, tolerance: float = 1e-9) -> bool:
    """Equal numbers, with JSON's None standing for NaN and infinity."""
    if expected is None or (isinstance(expected, float) and not math.isfinite(expected)):
        return actual is None or (isinstance(actual, float) and not math.isfinite(actual))
    return actual is not None and math.isclose(actual, expected, rel_tol=tolerance, abs_tol=1e-9)


def test_scores_match_independent_computation(model_run, total, total_labels) -> None:
    model, student_array = model_run["model"], model_run["student"]
    reference, reference_labels = model_run["reference"], model_run["reference_labels"]
    data = json.loads(model_run["paths"]["json"].read_text())
    voxel_ml = 27 / 1000  # 3 mm isotropic
    assert [row["structure"] for row in data["structures"]] == COMMON
    for row in data["structures"]:
        name = row["structure"]
        t = mask_of(total, total_labels, name)
        s = mask_of(student_array, model.labels, name)
        assert same(row["dice_teacher_student"], dice(t, s))
        assert same(row["volume_teacher_ml"], t.sum() * voxel_ml)
        assert same(row["volume_student_ml"], s.sum() * voxel_ml)
        assert same(row["teacher_only_ml"], (t & ~s).sum() * voxel_ml)
        assert same(row["student_only_ml"], (s & ~t).sum() * voxel_ml)
        expected_hd = hd95_independent(t, s, (3.0, 3.0, 3.0))
        assert same(row["hd95_teacher_student_mm"], expected_hd, tolerance=0.1), name
        if name == "kidney_right":  # not in the reference: no reference scores
            assert all(row[key] is None for key in FIELDS[3:7] + ["volume_reference_ml"])
            continue
        r = mask_of(reference, reference_labels, name)
        assert same(row["dice_teacher_reference"], dice(t, r))
        assert same(row["dice_student_reference"], dice(s, r))
        assert same(row["volume_reference_ml"], r.sum() * voxel_ml)
        assert same(row["hd95_teacher_reference_mm"], hd95_independent(t, r, (3.0,) * 3), 0.1)
    liver = data["structures"][0]
    assert 0.5 < liver["dice_teacher_reference"] < 1.0  # the eroded liver is not the teacher's
    assert data["reference"] == {"missing_structures": ["kidney_right"]}
    assert data["unmatched"]["only_in_student"] == []
    assert set(data["unmatched"]["only_in_teacher"]) == set(total_labels.names) - set(COMMON)


def test_costs_of_each_model(model_run) -> None:
    data = json.loads(model_run["paths"]["json"].read_text())
    network = model_run["model"].network
    assert data["student"]["name"] == model_run["model"].name
    assert data["student"]["parameters"] == sum(p.numel() for p in network.parameters())
    assert data["student"]["parameters"] == model_run["model"].metadata["parameters"]
    assert data["student"]["seconds"] > 0
    assert data["teacher"]["name"] == "TotalSegmentator"
    assert data["teacher"]["parameters"] is None
    assert (data["teacher"]["seconds"], data["teacher"]["peak_memory_bytes"]) == (0.0, 0)
    assert data["teacher"]["plan"] == "stored"
    text = format_comparison(model_run["result"])
    assert "TotalSegmentator" in text and f"{data['student']['parameters']:,}" in text
    assert "not in the reference (1): kidney_right" in text
    assert "only in the teacher (114)" in text


def test_csv_agrees_with_json(model_run) -> None:
    data = json.loads(model_run["paths"]["json"].read_text())
    with open(model_run["paths"]["csv"], newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert list(rows[0]) == FIELDS
    assert len(rows) == len(data["structures"])
    for row, entry in zip(rows, data["structures"]):
        assert row["structure"] == entry["structure"]
        for key in FIELDS[1:]:
            if row[key] == "":
                assert entry[key] is None, key
                continue
            value = float(row[key])
            assert same(entry[key], value, tolerance=1e-8), (key, row[key], entry[key])


def segment_masks(path: Path) -> dict[str, np.ndarray]:
    """Each segment's voxels read with slicerio, as (z, y, x) arrays."""
    segmentation = slicerio.read_segmentation(str(path))
    return {
        segment["name"]: slicerio.segment_mask(segmentation, segment).transpose(2, 1, 0)
        for segment in segmentation["segments"]
    }


def test_disagreement_is_teacher_xor_student(model_run, total, total_labels) -> None:
    path = model_run["paths"]["disagreement"]
    masks = segment_masks(path)
    names = [f"{n} {who} only" for n in COMMON for who in ("teacher", "student")]
    assert list(masks) == names
    model = model_run["model"]
    for name in COMMON:
        t = mask_of(total, total_labels, name)
        s = mask_of(model_run["student"], model.labels, name)
        assert np.array_equal(masks[f"{name} teacher only"], t & ~s), name
        assert np.array_equal(masks[f"{name} student only"], s & ~t), name
    segments = slicerio.read_segmentation(str(path))["segments"]
    assert [s["layer"] for s in segments] == [0, 1] * len(COMMON)
    colours = {tuple(round(c, 4) for c in s["color"]) for s in segments}
    assert len(colours) == len(segments)


def test_slicer_reads_the_disagreement_layers(model_run) -> None:
    from vtk.util import numpy_support

    path = model_run["paths"]["disagreement"]
    masks = segment_masks(path)
    segmentation = read_with_slicer(path)
    assert segmentation.GetNumberOfSegments() == len(masks) == 6
    assert segmentation.GetNumberOfLayers() == 2
    for index, (name, mask) in enumerate(masks.items()):
        segment = segmentation.GetNthSegment(index)
        assert segment.GetName() == name
        scalars = segment.GetRepresentation("Binary labelmap").GetPointData().GetScalars()
        values = numpy_support.vtk_to_numpy(scalars)
        assert int((values == segment.GetLabelValue()).sum()) == int(mask.sum()), name


def test_png_shows_three_panels_with_contours(model_run) -> None:
    from matplotlib.image import imread

    pixels = imread(model_run["paths"]["png"])
    assert pixels.shape[:2] == (600, 1500)
    rgb = pixels[..., :3]
    liver_colour = np.array(structure_colors(3)[0])
    near = np.abs(rgb - liver_colour).max(axis=-1) < 0.08
    assert near.sum() > 50  # the liver's contours are drawn
    assert rgb.std() > 0.1  # not blank


def test_panels_in_radiological_orientation(ct, total, total_labels) -> None:
    """Liver (patient right) left of the spleen on axial; superior at the top, whatever the
    stored orientation of the volume."""
    labels = np.zeros(total.shape, np.uint8)
    for value, name in enumerate(["liver", "spleen", "urinary_bladder"], start=1):
        labels[mask_of(total, total_labels, name)] = value
    label_image = as_image(labels, ct)
    flipped_ct = sitk.Flip(ct, [True, True, False])  # same anatomy, other index order
    flipped_labels = sitk.Flip(label_image, [True, True, False])
    assert flipped_ct.GetDirection() != ct.GetDirection()
    for image, label in ((ct, label_image), (flipped_ct, flipped_labels)):
        ct_array = sitk.GetArrayViewFromImage(image)
        z = int(np.argmax((sitk.GetArrayViewFromImage(label) == 1).sum(axis=(1, 2))))
        z_oriented = z if image.GetDirection()[8] > 0 else ct_array.shape[0] - 1 - z
        axial, coronal, _ = slice_panels(image, [label], centre=(z_oriented, 50, 60))
        columns = {v: np.argwhere(axial.labels[0] == v)[:, 1].mean() for v in (1, 2)}
        assert columns[1] < columns[2]  # liver on the image left = patient right
        rows = {v: np.argwhere(coronal.labels[0] == v)[:, 0] for v in (1, 3)}
        if len(rows[3]):
            assert rows[1].mean() < rows[3].mean()  # liver above the bladder
        assert axial.aspect == coronal.aspect == 1.0
        assert axial.edges["left"] == "R"


def test_identical_maps_agree_exactly(ct, total, total_labels, tmp_path) -> None:
    """Teacher and student the same map (student as a .seg.nrrd with other values)."""
    values = {"kidney_right": 1, "liver": 2, "spleen": 3}
    student_array = np.zeros(total.shape, np.uint8)
    for name, value in values.items():
        student_array[mask_of(total, total_labels, name)] = value
    seg_path = tmp_path / "student.seg.nrrd"
    write_seg_nrrd(
        as_image(student_array, ct), LabelTable({v: n for n, v in values.items()}), seg_path
    )
    teacher = StoredSegmentation(TOTAL, total_labels)
    student = StoredSegmentation(seg_path)
    assert student.name == "student" and teacher.name == "abdomen_seg_total_fast"
    result = compare(teacher, student, ct)
    assert [row.structure for row in result.rows] == list(values)
    for row in result.rows:
        assert row.dice_teacher_student == 1.0
        assert row.hd95_teacher_student_mm == 0.0
        assert row.teacher_only_ml == row.student_only_ml == 0.0
        assert row.dice_teacher_reference is None
    paths = write_comparison(result, tmp_path / "out", ct, png=True)
    masks = segment_masks(paths["disagreement"])
    assert len(masks) == 6 and not any(mask.any() for mask in masks.values())
    assert "Dice T-R" not in format_comparison(result)
    with open(paths["csv"], newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["dice_teacher_student"] for row in rows] == ["1", "1", "1"]
    assert all(row["dice_teacher_reference"] == "" for row in rows)


def test_a_missed_structure_scores_the_penalty_and_is_counted(
    ct, total, total_labels, tmp_path
) -> None:
    """The student misses the spleen entirely and labels a kidney the reference lacks: both
    score the image's diagonal, and the table and JSON count them under the mean HD95."""
    table = LabelTable({1: "liver", 2: "spleen", 3: "kidney_right"})
    maps = {}
    for role, kept in (
        ("teacher", ["liver", "spleen", "kidney_right"]),
        ("student", ["liver", "kidney_right"]),
        ("reference", ["liver", "spleen"]),
    ):
        array = np.zeros(total.shape, np.uint8)
        for value, name in table.items():
            if name in kept:
                array[mask_of(total, total_labels, name)] = value
        maps[role] = tmp_path / f"{role}.nii.gz"
        write_image(as_image(array, ct), maps[role])
    teacher, student = (StoredSegmentation(maps[r], table) for r in ("teacher", "student"))
    reference = read_label(maps["reference"], reference=ct)
    result = compare(teacher, student, ct, reference, table)
    diagonal = float(np.linalg.norm(np.array(ct.GetSize()) * np.array(ct.GetSpacing())))
    liver, spleen, kidney = result.rows
    assert spleen.hd95_teacher_student_mm == pytest.approx(diagonal)  # missed by the student
    assert spleen.hd95_student_reference_mm == pytest.approx(diagonal)
    assert kidney.hd95_student_reference_mm == pytest.approx(diagonal)  # spurious
    assert liver.hd95_teacher_student_mm == 0.0
    assert result.missed == {
        "teacher_student": {"missed": 1, "spurious": 0},
        "teacher_reference": {"missed": 0, "spurious": 1},
        "student_reference": {"missed": 1, "spurious": 1},
    }
    mean = result.mean()
    assert mean["hd95_teacher_student_mm"] == pytest.approx(diagonal / 3)
    assert mean["hd95_student_reference_mm"] == pytest.approx(diagonal * 2 / 3)
    data = json.loads(write_comparison(result, tmp_path / "out", ct)["json"].read_text())
    assert data["missed"] == result.missed
    assert data["hd95_penalty_mm"] == pytest.approx(diagonal)
    assert all(row["hd95_teacher_student_mm"] is not None for row in data["structures"])
    text = format_comparison(result).splitlines()
    header = next(line for line in text if line.startswith("structure"))
    missed_row = next(line for line in text if line.startswith("missed "))
    cell = missed_row[header.index("HD95 T-S") :]
    assert cell.split("  ")[0].strip() == "1"  # under the mean HD95 T-S
    assert "1 +1 spurious" in missed_row and "0 +1 spurious" in missed_row
    assert any("image's diagonal in mm" in line and f"{diagonal:.1f} mm" in line for line in text)


def test_name_mismatch_is_reported(ct, total, total_labels, tmp_path) -> None:
    student_array = np.zeros(total.shape, np.uint8)
    student_array[mask_of(total, total_labels, "liver")] = 1
    student_array[mask_of(total, total_labels, "kidney_right")] = 2
    path = tmp_path / "renamed.nii.gz"
    write_image(as_image(student_array, ct), path)
    teacher = StoredSegmentation(TOTAL, total_labels, name="TotalSegmentator")
    student = StoredSegmentation(path, LabelTable({1: "liver", 2: "right_kidney"}))
    result = compare(teacher, student, ct)
    assert [row.structure for row in result.rows] == ["liver"]
    assert result.only_in_student == ["right_kidney"]
    assert "kidney_right" in result.only_in_teacher
    assert "only in the student (1): right_kidney" in format_comparison(result)
    paths = write_comparison(result, tmp_path / "out", ct)
    data = json.loads(paths["json"].read_text())
    assert data["unmatched"]["only_in_student"] == ["right_kidney"]
    assert "png" not in paths and not (tmp_path / "out" / "comparison.png").exists()
    nothing_shared = StoredSegmentation(path, LabelTable({1: "leber", 2: "niere"}), name="de")
    with pytest.raises(MTKDError, match="share no structure name"):
        compare(teacher, nothing_shared, ct)


def test_stored_map_on_another_grid_names_the_file(ct, tmp_path, total_labels) -> None:
    path = tmp_path / "cropped.nii.gz"
    write_image(read_label(TOTAL)[:, :, 1:], path)
    stored = StoredSegmentation(path, total_labels)
    with expect_error(path, "grid"):
        stored.predict(ct)
    with expect_error(path, "grid"):
        compare(stored, StoredSegmentation(TOTAL, total_labels), ct)
    with expect_error(tmp_path / "map.nii.gz", "label table"):
        write_image(read_label(TOTAL), tmp_path / "map.nii.gz")
        StoredSegmentation(tmp_path / "map.nii.gz")


def test_probability_maps_become_label_maps(ct, total, total_labels, tmp_path) -> None:
    table = LabelTable({1: "liver", 2: "spleen", 3: "kidney_right"})
    expected = np.zeros(total.shape, np.uint8)
    for value, name in table.items():
        expected[mask_of(total, total_labels, name)] = value
    one_hot = np.stack([expected == c for c in range(4)]).astype(np.float32)
    probabilities = 0.1 + 0.6 * one_hot  # (C, z, y, x)
    npz = tmp_path / "case.npz"
    np.savez_compressed(npz, probabilities=probabilities)
    labelmap = StoredSegmentation(npz, table).predict(ct).labelmap
    assert np.array_equal(sitk.GetArrayViewFromImage(labelmap), expected)
    assert labelmap.GetOrigin() == ct.GetOrigin()

    nifti = tmp_path / "probabilities.nii.gz"  # channels last: (x, y, z, C)
    affine = nib.load(CT).affine
    nib.save(nib.Nifti1Image(probabilities.transpose(3, 2, 1, 0), affine), nifti)
    labelmap = StoredSegmentation(nifti, table).predict(ct).labelmap
    assert np.array_equal(sitk.GetArrayViewFromImage(labelmap), expected)

    with expect_error(npz, "4 channels", "3 expected"):
        StoredSegmentation(npz, LabelTable({1: "liver", 2: "spleen"})).predict(ct)
    cropped = tmp_path / "cropped.npz"
    np.savez(cropped, probabilities=probabilities[:, 1:])
    with expect_error(cropped, "grid"):
        StoredSegmentation(cropped, table).predict(ct)


def test_hd95_uses_physical_spacing(ct, total, total_labels, tmp_path) -> None:
    """On 3 x 3 x 6 mm voxels a one-slice shift of the liver is 6 mm, not 3 mm."""
    thick = ct[:, :, ::2]
    assert thick.GetSpacing() == (3.0, 3.0, 6.0)
    liver = mask_of(total[::2], total_labels, "liver")
    shifted = np.zeros_like(liver)
    shifted[1:] = liver[:-1]  # one slice towards the head
    table = LabelTable({1: "liver"})
    paths = []
    for name, array in (("teacher", liver), ("student", shifted)):
        paths.append(tmp_path / f"{name}.nii.gz")
        write_image(as_image(array.astype(np.uint8), thick), paths[-1])
    teacher, student = (StoredSegmentation(p, table) for p in paths)
    [row] = compare(teacher, student, thick).rows
    expected = hd95_independent(liver, shifted, (6.0, 3.0, 3.0))
    assert expected > 4.5  # the test distinguishes 6 mm slices from 3 mm pixels
    assert math.isclose(row.hd95_teacher_student_mm, expected, abs_tol=0.5)
    assert math.isclose(row.volume_teacher_ml, liver.sum() * 54 / 1000)


def test_missing_matplotlib_asks_for_the_plot_extra(ct, tmp_path, monkeypatch) -> None:
    label = as_image(np.zeros(sitk.GetArrayViewFromImage(ct).shape, np.uint8), ct)
    for module in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path = tmp_path / "picture.png"
    with expect_error(path, "pip install 'mtkd[plot]'"):
        write_contour_png(ct, label, label, path, ["liver"])
    assert not path.exists()


def test_folder_of_masks_named_by_structure(ct, total, total_labels, tmp_path) -> None:
    """TotalSegmentator's default output: one binary mask per structure, named by file."""
    folder = tmp_path / "segmentations"
    folder.mkdir()
    for name in ("spleen", "liver"):
        write_image(
            as_image(mask_of(total, total_labels, name).astype(np.uint8), ct),
            folder / f"{name}.nii.gz",
        )
    stored = StoredSegmentation(folder)
    assert stored.name == "segmentations"
    assert stored.labels == LabelTable({1: "liver", 2: "spleen"})
    array = sitk.GetArrayFromImage(stored.predict(ct).labelmap)
    assert np.array_equal(array == 1, mask_of(total, total_labels, "liver"))
    assert np.array_equal(array == 2, mask_of(total, total_labels, "spleen"))
    with expect_error(folder, "no mask file for kidney_right"):
        StoredSegmentation(folder, LabelTable({1: "liver", 2: "kidney_right"})).predict(ct)
