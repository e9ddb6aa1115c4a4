"""Dataset layouts (MSD, nnU-Net raw, folder pairs, single file, DICOM) and label tables."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import DATA
from helpers import expect_error

from mtkd.data.datasets import load_dataset
from mtkd.data.image_io import read_image, read_label, write_image
from mtkd.data.labels import LabelTable, check_label_map, remap_label_array
from mtkd.errors import MTKDError

TOTAL_JSON = DATA / "labels_total_v2.json"
# three small crops of the abdomen CT: (size, index)
CROPS = [([24, 24, 12], [40, 30, 40]), ([24, 24, 12], [50, 40, 50]), ([24, 24, 12], [30, 30, 60])]


@pytest.fixture(scope="module")
def volumes() -> list[tuple[sitk.Image, sitk.Image]]:
    """(CT, label map) crops of the real abdomen CT and its TotalSegmentator map."""
    ct = sitk.ReadImage(str(DATA / "abdomen_ct.nii.gz"))
    seg = sitk.ReadImage(str(DATA / "abdomen_seg_total_fast.nii.gz"))
    return [(sitk.RegionOfInterest(ct, s, i), sitk.RegionOfInterest(seg, s, i)) for s, i in CROPS]


def present_values(volumes) -> list[int]:
    values: set[int] = set()
    for _, seg in volumes:
        values.update(int(v) for v in np.unique(sitk.GetArrayViewFromImage(seg)))
    return sorted(values - {0})


def make_msd(root: Path, volumes, labels: dict | None = None, patients=None) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for k, (ct, seg) in enumerate(volumes):
        write_image(ct, root / "imagesTr" / f"abd_{k}.nii.gz")
        write_image(seg, root / "labelsTr" / f"abd_{k}.nii.gz")
        entry = {"image": f"./imagesTr/abd_{k}.nii.gz", "label": f"./labelsTr/abd_{k}.nii.gz"}
        if patients:
            entry["patient"] = patients[k]
        training.append(entry)
    (root / "imagesTr" / "._abd_0.nii.gz").write_bytes(b"macOS junk")
    labels = labels or {"0": "background", **json.loads(TOTAL_JSON.read_text())}
    dataset = {"name": "abd", "labels": labels, "numTraining": len(training), "training": training}
    (root / "dataset.json").write_text(json.dumps(dataset))
    return root


# ---------------------------------------------------------------- layouts


def test_msd_layout(tmp_path: Path, volumes) -> None:
    root = make_msd(tmp_path / "Task09", volumes, patients=["p1", "p1", "p2"])
    index = load_dataset(root)
    assert index.layout == "msd" and index.root == root
    assert [c.case_id for c in index.cases] == ["abd_0", "abd_1", "abd_2"]
    assert [c.patient_id for c in index.cases] == ["p1", "p1", "p2"]
    assert index.labels[1] == "spleen" and index.labels[5] == "liver" and len(index.labels) == 117
    first = index.cases[0]
    assert first.image == root / "imagesTr" / "abd_0.nii.gz"
    label = read_label(first.label, reference=read_image(first.image))
    check_label_map(label, index.labels, first.label)


def test_msd_with_nnunet_style_labels(tmp_path: Path, volumes) -> None:
    names = json.loads(TOTAL_JSON.read_text())
    labels = {"background": 0, **{name: int(v) for v, name in names.items()}}
    index = load_dataset(make_msd(tmp_path / "d", volumes, labels=labels))
    assert index.labels == LabelTable.from_json(TOTAL_JSON)
    assert [c.patient_id for c in index.cases] == [c.case_id for c in index.cases]


def test_msd_missing_label_file(tmp_path: Path, volumes) -> None:
    root = make_msd(tmp_path / "d", volumes)
    (root / "labelsTr" / "abd_1.nii.gz").unlink()
    with expect_error(root / "labelsTr" / "abd_1.nii.gz", "not found"):
        load_dataset(root)


def test_msd_missing_image_file(tmp_path: Path, volumes) -> None:
    root = make_msd(tmp_path / "d", volumes)
    (root / "imagesTr" / "abd_2.nii.gz").unlink()
    with expect_error(root / "imagesTr" / "abd_2.nii.gz", "image", "not found"):
        load_dataset(root)


def test_msd_image_without_label(tmp_path: Path, volumes) -> None:
    root = make_msd(tmp_path / "d", volumes)
    data = json.loads((root / "dataset.json").read_text())
    del data["training"][1]["label"]
    (root / "dataset.json").write_text(json.dumps(data))
    with expect_error(root / "imagesTr" / "abd_1.nii.gz", "without a label"):
        load_dataset(root)


def test_msd_duplicate_case(tmp_path: Path, volumes) -> None:
    root = make_msd(tmp_path / "d", volumes)
    data = json.loads((root / "dataset.json").read_text())
    data["training"].append(data["training"][0])
    (root / "dataset.json").write_text(json.dumps(data))
    with expect_error(root, "duplicate case id 'abd_0'"):
        load_dataset(root)


def test_msd_empty_training_list(tmp_path: Path) -> None:
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"1": "liver"}, "training": []}))
    with expect_error(tmp_path, "no cases"):
        load_dataset(tmp_path)


def test_broken_dataset_json(tmp_path: Path) -> None:
    (tmp_path / "dataset.json").write_text("{not json")
    with expect_error(tmp_path / "dataset.json", "JSON"):
        load_dataset(tmp_path)


def make_nnunet(root: Path, volumes, channels: dict | None = None) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for k, (ct, seg) in enumerate(volumes):
        write_image(ct, root / "imagesTr" / f"abd_{k:03d}_0000.nrrd")
        write_image(seg, root / "labelsTr" / f"abd_{k:03d}.nrrd")
    names = json.loads(TOTAL_JSON.read_text())
    dataset = {
        "channel_names": channels or {"0": "CT"},
        "labels": {"background": 0, **{name: int(v) for v, name in names.items()}},
        "numTraining": len(volumes),
        "file_ending": ".nrrd",
    }
    (root / "dataset.json").write_text(json.dumps(dataset))
    return root


def test_nnunet_raw_layout(tmp_path: Path, volumes) -> None:
    root = make_nnunet(tmp_path / "Dataset001_Abd", volumes)
    index = load_dataset(root)
    assert index.layout == "nnunet"
    assert [c.case_id for c in index.cases] == ["abd_000", "abd_001", "abd_002"]
    assert index.cases[1].image.name == "abd_001_0000.nrrd"
    assert index.cases[1].label.name == "abd_001.nrrd"
    assert index.labels.value_of("liver") == 5


def test_nnunet_several_channels(tmp_path: Path, volumes) -> None:
    root = make_nnunet(tmp_path / "d", volumes, channels={"0": "CT", "1": "PET"})
    with expect_error(root / "dataset.json", "2 input channels"):
        load_dataset(root)


def test_nnunet_label_without_image(tmp_path: Path, volumes) -> None:
    root = make_nnunet(tmp_path / "d", volumes)
    (root / "imagesTr" / "abd_002_0000.nrrd").unlink()
    with expect_error(root, "without an image", "abd_002.nrrd"):
        load_dataset(root)


def make_pairs(root: Path, volumes) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    formats = [(".nii.gz", ".nrrd"), (".mha", ".nii.gz"), (".nrrd", ".mha")]
    for k, ((ct, seg), (image_ext, label_ext)) in enumerate(zip(volumes, formats)):
        write_image(ct, root / "images" / f"case{k}{image_ext}")
        write_image(seg, root / "labels" / f"case{k}{label_ext}")
    return root


def test_folder_pairs_with_labels_json(tmp_path: Path, volumes) -> None:
    root = make_pairs(tmp_path / "pairs", volumes)
    index = load_dataset(root, labels_json=TOTAL_JSON)
    assert index.layout == "folders"
    assert [(c.case_id, c.image.name, c.label.name) for c in index.cases] == [
        ("case0", "case0.nii.gz", "case0.nrrd"),
        ("case1", "case1.mha", "case1.nii.gz"),
        ("case2", "case2.nrrd", "case2.mha"),
    ]
    assert index.labels == LabelTable.from_json(TOTAL_JSON)


def test_folder_pairs_names_from_label_values(tmp_path: Path, volumes) -> None:
    index = load_dataset(make_pairs(tmp_path / "pairs", volumes))
    expected = present_values(volumes)
    assert index.labels.label_values == expected
    assert index.labels[expected[0]] == f"label_{expected[0]}"


def test_folder_pairs_image_without_label(tmp_path: Path, volumes) -> None:
    root = make_pairs(tmp_path / "pairs", volumes)
    (root / "labels" / "case1.nii.gz").unlink()
    with expect_error(root, "without a label", "case1.mha"):
        load_dataset(root)


def test_folder_pairs_label_without_image(tmp_path: Path, volumes) -> None:
    root = make_pairs(tmp_path / "pairs", volumes)
    (root / "images" / "case2.nrrd").unlink()
    with expect_error(root, "without an image", "case2.mha"):
        load_dataset(root)


def test_folder_pairs_duplicate_ids(tmp_path: Path, volumes) -> None:
    root = make_pairs(tmp_path / "pairs", volumes)
    write_image(volumes[0][0], root / "images" / "case0.mha")
    with expect_error(root, "duplicate case id 'case0'"):
        load_dataset(root)


def test_folder_pairs_empty(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with expect_error(tmp_path, "no cases"):
        load_dataset(tmp_path)


def test_folder_pairs_missing_labels_folder(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with expect_error(tmp_path / "labels", "not found"):
        load_dataset(tmp_path)


def test_single_image_with_and_without_label(tmp_path: Path, volumes) -> None:
    ct, seg = volumes[0]
    write_image(ct, tmp_path / "patient7.nii.gz")
    write_image(seg, tmp_path / "patient7_seg.nii.gz")
    index = load_dataset(tmp_path / "patient7.nii.gz", label=tmp_path / "patient7_seg.nii.gz")
    assert index.layout == "single"
    assert [(c.case_id, c.label.name) for c in index.cases] == [("patient7", "patient7_seg.nii.gz")]
    assert index.labels.label_values == present_values(volumes[:1])
    alone = load_dataset(tmp_path / "patient7.nii.gz", labels_json=TOTAL_JSON)
    assert alone.cases[0].label is None and len(alone.labels) == 117
    assert len(load_dataset(tmp_path / "patient7.nii.gz").labels) == 0


def test_single_image_missing_label(tmp_path: Path, volumes) -> None:
    write_image(volumes[0][0], tmp_path / "ct.nii.gz")
    with expect_error(tmp_path / "seg.nii.gz", "not found"):
        load_dataset(tmp_path / "ct.nii.gz", label=tmp_path / "seg.nii.gz")


def test_label_argument_refused_for_a_dataset_folder(tmp_path: Path, volumes) -> None:
    root = make_msd(tmp_path / "d", volumes)
    with expect_error(root, "label="):
        load_dataset(root, label=root / "labelsTr" / "abd_0.nii.gz")


def write_dicom_series(image: sitk.Image, folder: Path) -> None:
    folder.mkdir(parents=True)
    d = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    hu = sitk.Cast(image, sitk.sitkInt16)
    for k in range(image.GetDepth()):
        sl = hu[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in {
            "0008|0060": "CT",
            "0020|000e": "1.2.826.0.1.3680043.8.498.77",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
            "0028|1052": "-1024",
            "0028|1053": "1",
            "0008|0021": time.strftime("%Y%m%d"),
        }.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k:04d}.dcm"))
        writer.Execute(sl)


def test_dicom_series_folder(tmp_path: Path, volumes) -> None:
    ct = volumes[1][0]
    write_dicom_series(ct, tmp_path / "CT_0001")
    index = load_dataset(tmp_path / "CT_0001", labels_json=TOTAL_JSON)
    assert index.layout == "dicom"
    (case,) = index.cases
    assert case.case_id == "CT_0001" and case.image == tmp_path / "CT_0001" and case.label is None
    image = read_image(case.image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(ct))


def test_missing_path(tmp_path: Path) -> None:
    with expect_error(tmp_path / "nothing", "not found"):
        load_dataset(tmp_path / "nothing")


def test_folder_that_is_no_dataset(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("hello")
    with expect_error(tmp_path, "not a dataset"):
        load_dataset(tmp_path)


# ---------------------------------------------------------------- label tables


def test_label_table_forms_agree() -> None:
    msd = LabelTable.from_msd({"labels": {"0": "background", "1": "spleen", "2": "liver"}})
    nnunet = LabelTable.from_msd({"labels": {"background": 0, "spleen": 1, "liver": 2}})
    values = LabelTable.from_label_values([0, 2, 1, 2])
    assert msd == nnunet and list(msd.items()) == [(1, "spleen"), (2, "liver")]
    assert values.names == ["label_1", "label_2"]
    assert LabelTable.from_dict(json.loads(json.dumps(msd.to_dict()))) == msd


def test_label_table_from_json_file() -> None:
    table = LabelTable.from_json(TOTAL_JSON)
    assert len(table) == 117 and table[117] == "costal_cartilages" and 0 not in table


@pytest.mark.parametrize(
    "labels, words",
    [
        ({"liver": [1, 2]}, "region-based"),
        ({"1": "liver", "2": "liver"}, "liver"),
        ({"0": "background"}, "only the background"),
        ({"1": ""}, "non-empty"),
        ({"x": "y"}, "cannot read"),
    ],
)
def test_bad_label_files(tmp_path: Path, labels: dict, words: str) -> None:
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(labels))
    with expect_error(path, words):
        LabelTable.from_json(path)


def test_select_renumbers_in_given_order() -> None:
    table = LabelTable.from_json(TOTAL_JSON)
    chosen, mapping = table.select(["liver", "spleen", "kidney_left"])
    assert list(chosen.items()) == [(1, "liver"), (2, "spleen"), (3, "kidney_left")]
    assert mapping == {5: 1, 1: 2, 3: 3}
    with pytest.raises(MTKDError, match="pancreaz.*available: spleen, kidney_right"):
        table.select(["liver", "pancreaz"])


def test_check_label_map(volumes) -> None:
    seg = volumes[0][1]
    table = LabelTable.from_json(TOTAL_JSON)
    assert check_label_map(seg, table, "seg.nii.gz") == present_values(volumes[:1])
    small = LabelTable({1: "spleen"})
    with expect_error("seg.nii.gz", "not in the label table", "5"):
        check_label_map(seg, small, "seg.nii.gz")
    with expect_error("empty.nii.gz", "empty"):
        check_label_map(seg * 0, table, "empty.nii.gz")


def test_remap_label_array_matches_a_plain_loop() -> None:
    rng = np.random.default_rng(3)
    array = rng.integers(0, 120, size=(20, 30, 40)).astype(np.uint8)
    mapping = {5: 1, 1: 2, 3: 3, 200: 4}
    result = remap_label_array(array, mapping)
    expected = np.zeros_like(array)
    for old, new in mapping.items():
        expected[array == old] = new
    assert result.shape == array.shape and result.dtype == np.uint8
    np.testing.assert_array_equal(result, expected)
    np.testing.assert_array_equal(remap_label_array(array.astype(np.float32), mapping), expected)
    wide = remap_label_array(array.astype(np.int64) * 10_000_000, {50_000_000: 7})
    np.testing.assert_array_equal(wide, np.where(array == 5, 7, 0))


def test_remap_label_array_is_fast() -> None:
    array = np.random.default_rng(0).integers(0, 118, size=(128, 128, 128)).astype(np.uint8)
    start = time.perf_counter()
    remap_label_array(array, {v: (v % 7) for v in range(1, 118)})
    assert time.perf_counter() - start < 0.5
