"""Slicer .seg.nrrd writing/reading and the terminology table."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from conftest import DATA, ROOT
from helpers import read_with_slicer

from mtkd.data.labels import LabelTable
from mtkd.data.segnrrd import read_seg_nrrd, write_seg_nrrd
from mtkd.data.terminology import generated_color, lookup
from mtkd.errors import MTKDError

CSV = ROOT / "mtkd" / "resources" / "terminology.csv"


def rotation(angle_z: float, angle_x: float) -> list[float]:
    """A proper rotation (det +1), far from identity."""
    cz, sz, cx, sx = math.cos(angle_z), math.sin(angle_z), math.cos(angle_x), math.sin(angle_x)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return (rz @ rx).ravel().tolist()


@pytest.fixture(scope="module")
def labelmap() -> sitk.Image:
    """40x30x20 crop of the TotalSegmentator map, with a rotated direction and odd spacing."""
    seg = sitk.ReadImage(str(DATA / "abdomen_seg_total_fast.nii.gz"))
    crop = sitk.RegionOfInterest(seg, [40, 30, 20], [40, 30, 40])
    crop.SetDirection(rotation(0.4, -0.3))
    crop.SetSpacing((2.5, 3.0, 3.5))
    crop.SetOrigin((12.5, -40.25, 300.0))
    return crop


@pytest.fixture(scope="module")
def table() -> LabelTable:
    return LabelTable.from_json(DATA / "labels_total_v2.json")


def present(image: sitk.Image) -> list[int]:
    return sorted(set(np.unique(sitk.GetArrayViewFromImage(image)).tolist()) - {0})


def test_round_trip_keeps_voxels_geometry_and_names(tmp_path: Path, labelmap, table) -> None:
    path = tmp_path / "seg.seg.nrrd"
    write_seg_nrrd(labelmap, table, path)
    image, read_table = read_seg_nrrd(path)
    assert read_table == table  # all 117 structures, also those absent from the crop
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(labelmap))
    assert image.GetSize() == labelmap.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), labelmap.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(image.GetOrigin(), labelmap.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(image.GetDirection(), labelmap.GetDirection(), atol=1e-9)
    assert [p.name for p in tmp_path.iterdir()] == ["seg.seg.nrrd"]


def test_slicerio_reads_segments(tmp_path: Path, labelmap, table) -> None:
    path = tmp_path / "seg.seg.nrrd"
    write_seg_nrrd(labelmap, table, path)
    segmentation = slicerio.read_segmentation(str(path))
    segments = segmentation["segments"]
    assert [s["name"] for s in segments] == table.names
    assert [s["labelValue"] for s in segments] == table.label_values
    assert all(s["layer"] == 0 for s in segments)
    for segment in segments:
        np.testing.assert_allclose(segment["color"], lookup(segment["name"]).color, atol=1e-5)
    liver = slicerio.segment_from_name(segmentation, "liver")
    assert liver["terminology"]["type"] == ["SCT", "10200004", "Liver"]
    assert liver["terminology"]["category"] == ["SCT", "123037004", "Anatomical Structure"]
    assert liver["terminology"]["contextName"].endswith("3D Slicer General Anatomy list")
    adrenal = slicerio.segment_from_name(segmentation, "adrenal_gland_left")
    assert adrenal["terminology"]["typeModifier"] == ["SCT", "7771000", "Left"]
    # geometry as Slicer sees it: IJK -> LPS = direction * spacing, origin
    direction = np.array(labelmap.GetDirection()).reshape(3, 3)
    expected = np.eye(4)
    expected[:3, :3] = direction * np.array(labelmap.GetSpacing())
    expected[:3, 3] = labelmap.GetOrigin()
    np.testing.assert_allclose(segmentation["ijkToLPS"], expected, atol=1e-9)
    # voxels: slicerio gives (i, j, k) order
    voxels = segmentation["voxels"]
    np.testing.assert_array_equal(voxels, sitk.GetArrayFromImage(labelmap).transpose(2, 1, 0))
    for value in present(labelmap):
        segment = slicerio.segment_from_name(segmentation, table[value])
        mask = slicerio.segment_mask(segmentation, segment)
        assert mask.sum() == (voxels == value).sum() > 0


def test_header_fields_as_slicer_writes_them(tmp_path: Path, labelmap, table) -> None:
    path = tmp_path / "seg.seg.nrrd"
    write_seg_nrrd(labelmap, table, path)
    header = nrrd.read_header(str(path))
    assert header["space"] == "left-posterior-superior"
    assert header["kinds"] == ["domain", "domain", "domain"]
    assert header["encoding"] == "gzip"
    assert header["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert header["Segmentation_ContainedRepresentationNames"] == "Binary labelmap|"
    spleen = table.names.index("spleen")
    assert header[f"Segment{spleen}_Tags"] == (
        "TerminologyEntry:Segmentation category and type - 3D Slicer General Anatomy list"
        "~SCT^123037004^Anatomical Structure~SCT^78961009^Spleen~^^"
        "~Anatomic codes - DICOM master list~^^~^^|"
    )
    full = "0 39 0 29 0 19"
    for index in range(len(table)):
        assert header[f"Segment{index}_Extent"] == full
        assert header[f"Segment{index}_NameAutoGenerated"] == "0"
        assert header[f"Segment{index}_Layer"] == "0"
    absent = next(v for v in table.label_values if v not in present(labelmap))
    assert header[f"Segment{table.label_values.index(absent)}_LabelValue"] == str(absent)


def test_unknown_names_get_generated_colours_and_no_terminology(tmp_path: Path, labelmap) -> None:
    a, b = present(labelmap)[:2]
    binary = sitk.Cast(labelmap == a, sitk.sitkUInt8) + sitk.Cast(labelmap == b, sitk.sitkUInt8) * 2
    table = LabelTable({1: "hepatic tumour", 2: "Spleen"})
    path = tmp_path / "custom.seg.nrrd"
    write_seg_nrrd(binary, table, path, colors={"Spleen": (0.1, 0.2, 0.3)})
    segments = slicerio.read_segmentation(str(path))["segments"]
    tumour, spleen = segments
    assert "terminology" not in tumour
    np.testing.assert_allclose(tumour["color"], generated_color("hepatic tumour"), atol=1e-5)
    assert tumour["colorAutoGenerated"] is True
    np.testing.assert_allclose(spleen["color"], (0.1, 0.2, 0.3), atol=1e-6)
    assert spleen["terminology"]["type"][2] == "Spleen"  # case-insensitive lookup
    image, read_table = read_seg_nrrd(path)
    assert read_table == table
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(binary))


def test_uint16_label_values(tmp_path: Path, labelmap) -> None:
    big = sitk.Cast(labelmap == present(labelmap)[0], sitk.sitkUInt16) * 1000
    path = tmp_path / "big.seg.nrrd"
    write_seg_nrrd(big, LabelTable({1000: "liver"}), path)
    image, table = read_seg_nrrd(path)
    assert image.GetPixelID() == sitk.sitkUInt16 and table.label_values == [1000]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(big))


def test_empty_map_writes_empty_extents(tmp_path: Path, labelmap) -> None:
    path = tmp_path / "empty.seg.nrrd"
    write_seg_nrrd(labelmap * 0, LabelTable({1: "liver"}), path)
    segment = slicerio.read_segmentation(str(path))["segments"][0]
    assert segment["extent"] == [0, -1, 0, -1, 0, -1] and segment["name"] == "liver"


def test_values_outside_the_table(tmp_path: Path, labelmap) -> None:
    path = tmp_path / "x.seg.nrrd"
    with pytest.raises(MTKDError, match=f"{path}.*not in the label table"):
        write_seg_nrrd(labelmap, LabelTable({5: "liver"}), path)
    assert not path.exists()


def test_wrong_extension(tmp_path: Path, labelmap, table) -> None:
    with pytest.raises(MTKDError, match="seg.nrrd"):
        write_seg_nrrd(labelmap, table, tmp_path / "x.nii.gz")


def test_plain_label_nrrd_is_read_with_generic_names(tmp_path: Path, labelmap) -> None:
    path = tmp_path / "plain.nrrd"
    sitk.WriteImage(labelmap, str(path))
    image, table = read_seg_nrrd(path)
    assert table.label_values == present(labelmap)
    assert table.names[0] == f"label_{table.label_values[0]}"


def test_terminology_table_matches_csv() -> None:
    with CSV.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 170
    for row in rows:
        style = lookup(row["Structure"])
        rgb = tuple(int(v) / 255 for v in row["DicomRGBColor"].split(","))
        np.testing.assert_allclose(style.color, rgb, atol=1e-6)
        assert style.type is not None
        assert style.type.value == row["SegmentedPropertyTypeCodeSequence.CodeValue"]
    cyst = lookup("kidney_cyst_left")
    assert (cyst.region.value, cyst.region_modifier.meaning) == ("64033007", "Left")
    assert "~SCT^64033007^Kidney~SCT^7771000^Left" in cyst.terminology_entry()
    assert lookup("Vertebrae L5").type == lookup("vertebrae_L5").type


def test_generated_colours_are_deterministic_and_distinct() -> None:
    names = [f"structure_{k}" for k in range(20)]
    colours = [lookup(n).color for n in names]
    assert colours == [lookup(n).color for n in names]
    assert len(set(colours)) == len(colours)
    assert all(0.0 <= c <= 1.0 for colour in colours for c in colour)
    assert (
        lookup("structure_0").category is None and lookup("structure_0").terminology_entry() is None
    )


def test_slicer_storage_node_reads_every_segment(tmp_path: Path, labelmap, table) -> None:
    """Slicer's own reader (slicer-core, headless) sees the same segments, voxels and geometry."""
    pytest.importorskip("slicer")
    from vtk.util import numpy_support

    # an absent structure first: Slicer builds the layer from the first segment's extent
    absent = next(v for v in table.label_values if v not in present(labelmap))
    order = [absent] + [v for v in table.label_values if v != absent]
    reordered = LabelTable((v, table[v]) for v in order)
    path = tmp_path / "seg.seg.nrrd"
    write_seg_nrrd(labelmap, reordered, path)

    segmentation = read_with_slicer(path)
    assert segmentation.GetNumberOfSegments() == len(reordered)
    voxels = sitk.GetArrayFromImage(labelmap)
    for index, (value, name) in enumerate(reordered.items()):
        segment = segmentation.GetNthSegment(index)
        assert (segment.GetName(), segment.GetLabelValue()) == (name, value)
        np.testing.assert_allclose(segment.GetColor(), lookup(name).color, atol=1e-5)
        layer = segment.GetRepresentation("Binary labelmap")
        scalars = layer.GetPointData().GetScalars()
        found = 0 if scalars is None else int((numpy_support.vtk_to_numpy(scalars) == value).sum())
        assert found == int((voxels == value).sum())
    import vtk

    matrix = np.zeros((4, 4))
    image_to_world = vtk.vtkMatrix4x4()
    segmentation.GetNthSegment(1).GetRepresentation("Binary labelmap").GetImageToWorldMatrix(
        image_to_world
    )
    for r in range(4):
        for c in range(4):
            matrix[r, c] = image_to_world.GetElement(r, c)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    direction = np.array(labelmap.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(
        matrix[:3, :3], lps_to_ras @ direction * np.array(labelmap.GetSpacing()), atol=1e-6
    )
    np.testing.assert_allclose(
        matrix[:3, 3], lps_to_ras @ np.array(labelmap.GetOrigin()), atol=1e-6
    )
