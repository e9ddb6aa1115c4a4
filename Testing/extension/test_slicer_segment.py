"""MTKDSegment's logic against real MRML (``slicer-core``): a real CT with an oblique direction
in a volume node -> the engine in a background process -> a segmentation node that matches
``mtkd segment`` voxel for voxel; comparison tables; cancel and failure leave the scene as
it was."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
import vtk
from slicer_scene import load_volume, new_scene

from mtkd.cli import main
from mtkd.data.labels import LabelTable, remap_label_array
from mtkd.data.segnrrd import write_segmentation
from mtkd.data.terminology import lookup
from mtkd.library import ModelLibrary
from mtkd.modelfiles.model_io import load_model
from mtkd.progress import parse_progress
from MTKDLib.compare_logic import CompareLogic
from MTKDLib.library_table import format_size, library_rows, model_choices, version_text
from MTKDLib.mrml_io import labelmap_array, load_segmentation, segment_names
from MTKDLib.segment_logic import SegmentLogic

PYTHON = sys.executable  # the engine process runs in this interpreter, as PythonSlicer would


def node_count(scene) -> int:
    return scene.GetNumberOfNodes()


@pytest.fixture(scope="module")
def oblique_ct(data_dir, tmp_path_factory):
    """A crop of the real abdomen CT, rotated 25 degrees about the axial axis and tilted, as
    NRRD (its label crop, TotalSegmentator ids, alongside)."""
    folder = tmp_path_factory.mktemp("oblique")
    image = sitk.ReadImage(str(data_dir / "abdomen_ct.nii.gz"))
    labels = sitk.ReadImage(str(data_dir / "abdomen_seg_total_fast.nii.gz"))
    index, size = [20, 15, 40], [80, 70, 30]
    image = sitk.RegionOfInterest(image, size, index)
    labels = sitk.RegionOfInterest(labels, size, index)
    a, b = np.deg2rad(25.0), np.deg2rad(10.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    direction = (rz @ rx @ np.array(image.GetDirection()).reshape(3, 3)).ravel().tolist()
    for item in (image, labels):
        item.SetDirection(direction)
    sitk.WriteImage(image, str(folder / "ct.nrrd"))
    sitk.WriteImage(labels, str(folder / "labels.nrrd"))
    return folder


@pytest.fixture
def scene_with_ct(oblique_ct):
    scene, _ = new_scene()
    volume = load_volume(scene, oblique_ct / "ct.nrrd", "Abdomen CT")
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    assert abs(matrix.GetElement(0, 1)) > 0.1  # really oblique, not axis-aligned
    return scene, volume


@pytest.fixture(scope="module")
def cli_segmentation(teacher_run, oblique_ct, tmp_path_factory):
    """What ``mtkd segment`` writes for the same file (a label map)."""
    out = tmp_path_factory.mktemp("cli") / "ct.nii.gz"
    assert main(["segment", str(teacher_run), str(oblique_ct / "ct.nrrd"), "-o", str(out)]) == 0
    return sitk.GetArrayFromImage(sitk.ReadImage(str(out)))


def test_segmentation_node_matches_the_command_line(teacher_run, scene_with_ct, cli_segmentation):
    scene, volume = scene_with_ct
    labels = load_model(teacher_run).labels
    segmentation = SegmentLogic(scene, python=PYTHON).segment(volume, teacher_run, "cpu")

    assert segmentation.IsA("vtkMRMLSegmentationNode")
    assert segmentation.GetName() == f"Abdomen CT {teacher_run.name}"
    assert segment_names(segmentation) == labels.names
    for index, name in enumerate(labels.names):
        segment = segmentation.GetSegmentation().GetNthSegment(index)
        assert np.allclose(segment.GetColor(), lookup(name).color, atol=1e-3)
        entry = vtk.mutable("")
        assert segment.GetTag("TerminologyEntry", entry)
        assert lookup(name).type.value in str(entry)  # e.g. SNOMED CT code of the organ

    array = labelmap_array(segmentation, volume, labels.names)
    assert array.shape == cli_segmentation.shape
    assert np.count_nonzero(cli_segmentation) > 100  # the model does segment something
    assert np.array_equal(array, cli_segmentation)  # voxel for voxel

    hierarchy = scene.GetSubjectHierarchyNode()
    parent = hierarchy.GetItemParent(hierarchy.GetItemByDataNode(segmentation))
    assert parent == hierarchy.GetItemByDataNode(volume)  # shown under its CT


def test_keep_largest_gives_what_the_command_line_gives(
    teacher_run, scene_with_ct, oblique_ct, tmp_path
):
    """The panel's "Keep only the largest part of each structure": `mtkd segment --keep-largest`,
    voxel for voxel, one connected part per structure."""
    from scipy import ndimage

    scene, volume = scene_with_ct
    names = load_model(teacher_run).labels.names
    node = SegmentLogic(scene, python=PYTHON).segment(volume, teacher_run, "cpu", keep_largest=True)
    out = tmp_path / "largest.nii.gz"
    argv = ["segment", str(teacher_run), str(oblique_ct / "ct.nrrd"), "-o", str(out)]
    assert main([*argv, "--keep-largest"]) == 0
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    array = labelmap_array(node, volume, names)
    assert np.array_equal(array, expected)
    full = np.ones((3, 3, 3))
    assert all(ndimage.label(array == v, structure=full)[1] == 1 for v in np.unique(array) if v)
    scene.RemoveNode(node)


def test_progress_is_reported_while_running(teacher_run, scene_with_ct):
    """Every progress line the job printed reaches the front end through ``poll`` (in
    ``new_lines``), in order, however late the polls come (a loaded machine may poll only
    after the job has ended)."""
    scene, volume = scene_with_ct
    task = SegmentLogic(scene, python=PYTHON).start(volume, teacher_run, "cpu")
    updates = []
    while True:
        state = task.poll()
        updates += [u for u in map(parse_progress, state.new_lines) if u is not None]
        if state.finished:
            break
        time.sleep(0.02)
    assert task.state.succeeded, task.state.error
    seen = [update.stage for update in updates]
    assert any("segmenting" in stage for stage in seen), seen
    fractions = [update.fraction for update in updates]
    assert fractions == sorted(fractions)  # progress never goes back
    assert not task.workdir.exists()  # scratch files removed


def test_cancel_leaves_the_scene_as_it_was(teacher_run, scene_with_ct):
    scene, volume = scene_with_ct
    before = node_count(scene)
    task = SegmentLogic(scene, python=PYTHON).start(volume, teacher_run, "cpu")
    task.cancel()  # returns at once; the process tree ends and the scratch folder goes after
    assert task.state.cancelled and task.state.finished
    assert task.poll().finished and task.result is None
    deadline = time.monotonic() + 60
    while (task.process.returncode is None or task.workdir.exists()) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert task.process.returncode is not None  # the process tree is gone
    assert not task.workdir.exists()
    assert node_count(scene) == before


def test_a_broken_model_fails_clearly_and_adds_nothing(scene_with_ct, tmp_path):
    scene, volume = scene_with_ct
    before = node_count(scene)
    missing = tmp_path / "no-such-model"
    task = SegmentLogic(scene, python=PYTHON).start(volume, missing, "cpu")
    with pytest.raises(RuntimeError) as info:
        task.wait(timeout=120)
    assert "model not found" in str(info.value) and str(missing) in str(info.value)
    assert node_count(scene) == before


def test_bad_inputs_are_refused_before_anything_runs(teacher_run, scene_with_ct):
    scene, volume = scene_with_ct
    logic = SegmentLogic(scene, python=PYTHON)
    with pytest.raises(ValueError, match="select a CT volume"):
        logic.start(None, teacher_run)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    with pytest.raises(ValueError, match="not a scalar"):
        logic.start(labelmap, teacher_run)
    with pytest.raises(ValueError, match="device"):
        logic.start(volume, teacher_run, device="tpu")
    before = node_count(scene)
    with pytest.raises(ValueError, match="cuda:N"):  # the same device rule as Segment
        CompareLogic(scene, python=PYTHON).start(volume, teacher_run, teacher_run, "cuda:x")
    assert node_count(scene) == before


@pytest.fixture(scope="module")
def totalsegmentator_result(data_dir, oblique_ct, teacher_run):
    """The real TotalSegmentator labels of the crop, as another tool's ``.seg.nrrd``
    (the structures the model knows)."""
    structures = load_model(teacher_run).labels.names
    table, mapping = LabelTable.from_json(data_dir / "labels_total_v2.json").select(structures)
    labels = sitk.ReadImage(str(oblique_ct / "labels.nrrd"))
    array = remap_label_array(sitk.GetArrayFromImage(labels), mapping)
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(labels)
    path = oblique_ct / "totalsegmentator.seg.nrrd"
    write_segmentation(image, table, path)
    return path


def table_rows(node) -> list[dict]:
    table = node.GetTable()
    columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    return [
        {name: table.GetValue(r, c).ToString() for c, name in enumerate(columns)}
        for r in range(table.GetNumberOfRows())
    ]


def test_compare_with_a_segmentation_node_as_teacher(
    teacher_run, oblique_ct, totalsegmentator_result, tmp_path
):
    """The teacher is a segmentation already in the scene (another tool's result); the
    table matches ``mtkd compare`` on the same files."""
    scene, _ = new_scene()
    volume = load_volume(scene, oblique_ct / "ct.nrrd", "Abdomen CT")
    teacher = load_segmentation(scene, totalsegmentator_result, "TotalSegmentator", volume)
    before = node_count(scene)

    nodes = CompareLogic(scene, python=PYTHON).compare(volume, teacher_run, teacher, device="cpu")

    out = tmp_path / "cli"
    argv = ["compare", str(oblique_ct / "ct.nrrd"), "--teacher", str(totalsegmentator_result)]
    assert main([*argv, "--student", str(teacher_run), "-o", str(out)]) == 0
    expected = json.loads((out / "comparison.json").read_text())["structures"]
    rows = table_rows(nodes.structures)
    assert [row["Structure"] for row in rows] == [item["structure"] for item in expected]
    for row, item in zip(rows, expected, strict=True):
        dice = item["dice_teacher_student"]
        assert float(row["Dice teacher-student"]) == pytest.approx(
            float("nan") if dice is None else dice, nan_ok=True
        )
        assert float(row["Teacher volume (mL)"]) == pytest.approx(item["volume_teacher_ml"])
        assert float(row["Student volume (mL)"]) == pytest.approx(item["volume_student_ml"])
    assert any(float(item["volume_teacher_ml"]) > 1 for item in expected)  # not empty maps

    models = table_rows(nodes.models)
    assert [row["Role"] for row in models] == ["teacher", "student"]
    assert float(models[1]["Time (s)"]) > 0 and float(models[1]["Parameters"]) > 0
    assert nodes.teacher is None  # the teacher node is already in the scene
    disagreement = segment_names(nodes.disagreement)
    assert disagreement == [f"{n} {who} only" for n in [r["Structure"] for r in rows]
                            for who in ("teacher", "student")]  # fmt: skip
    # structures, model costs, disagreement and student segmentation: four new nodes
    added = {scene.GetNthNode(i).GetID() for i in range(before, node_count(scene))}
    assert {nodes.structures.GetID(), nodes.models.GetID()} <= added
    assert {nodes.disagreement.GetID(), nodes.student.GetID()} <= added


def test_compare_two_models_adds_both_segmentations(teacher_run, scene_with_ct):
    scene, volume = scene_with_ct
    nodes = CompareLogic(scene, python=PYTHON).compare(volume, teacher_run, teacher_run,
                                                       device="cpu")  # fmt: skip
    assert nodes.teacher is not None and nodes.teacher.IsA("vtkMRMLSegmentationNode")
    labels = load_model(teacher_run).labels.names
    assert segment_names(nodes.teacher) == segment_names(nodes.student) == labels
    rows = table_rows(nodes.structures)
    for row in rows:  # one model against itself agrees wherever it labels anything
        if float(row["Teacher volume (mL)"]) > 0:
            assert float(row["Dice teacher-student"]) == pytest.approx(1.0)
    same = labelmap_array(nodes.teacher, volume) == labelmap_array(nodes.student, volume)
    assert same.all()


def test_failed_compare_adds_nothing(teacher_run, scene_with_ct, tmp_path):
    scene, volume = scene_with_ct
    before = node_count(scene)
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "mtkd_model.json").write_text("{ not json")
    task = CompareLogic(scene, python=PYTHON).start(volume, teacher_run, bad, device="cpu")
    with pytest.raises(RuntimeError, match="metadata"):
        task.wait(timeout=120)
    assert node_count(scene) == before


def test_library_rows_show_what_the_panel_lists(teacher_run, tmp_path):
    library = ModelLibrary(tmp_path / "library")
    entry = library.import_model(teacher_run, name="Abdomen teacher")
    broken = library.import_model(teacher_run, name="Broken later")
    (broken.path / "model.pt").unlink()  # noticed when the entry is read
    entries = library.entries()
    rows = dict(zip([e.key for e in entries], library_rows(entries), strict=True))
    name, structures, fmt, size, created, _teacher, dice, version = rows[entry.key]
    assert name == "Abdomen teacher" and fmt == "pytorch"
    assert structures == ", ".join(load_model(teacher_run).labels.names)
    assert size.endswith(("KB", "MB")) and float(size.split()[0]) > 0
    assert created == entry.created[:10]
    metrics = json.loads((teacher_run / "model" / "mtkd_model.json").read_text())["metrics"]
    assert dice == f"{metrics['best_val_dice']:.3f}"
    assert "unusable" in rows[broken.key][0]
    assert version == ""  # not a loop version
    history = {"version": 2, "previous": "abdomen-teacher", "cases_added": ["a", "b"],
               "val_dice_before": 0.5, "val_dice_after": 0.625}  # fmt: skip
    assert version_text(history) == "v2 of abdomen-teacher (+2 cases, Dice 0.500 -> 0.625)"
    assert model_choices(entries) == [(f"Abdomen teacher ({len(entry.labels)} structures)",
                                       entry.key)]  # fmt: skip
    assert format_size(1536) == "1.5 KB" and format_size(3 * 2**30) == "3.0 GB"
