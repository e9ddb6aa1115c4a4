"""Labels as clinicians give them, against real MRML (``slicer-core``) and real files: segments
matched by terminology code before names, a structure marked not annotated, ambiguity
refused, and nnU-Net v2 label maps read by the training set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import NNUNET_STRUCTURES, write_nnunet_v2
from slicer_scene import new_scene, write_slab_cases
from slicer_scene import scene_cases as slicer_scene_cases

from mtkd.data.datasets import load_dataset
from MTKDLib.mrml_io import load_segmentation
from MTKDLib.segment_labels import (
    add_not_annotated_segment,
    is_not_annotated,
    mark_not_annotated,
    match_case,
    set_not_annotated,
)
from MTKDLib.training_set import SceneCase, TrainingSet, export_training_set, plan_labels

STRUCTURES = ["liver", "spleen", "kidney_right"]


@pytest.fixture(scope="module")
def case_files(data_dir, tmp_path_factory):
    """Two 6-slice slabs of the real abdomen CT (NRRD) and their coded ``.seg.nrrd``."""
    return write_slab_cases(data_dir, tmp_path_factory.mktemp("label_slabs"), [80, 88], STRUCTURES)


def scene_cases(scene, files) -> list[SceneCase]:
    return slicer_scene_cases(scene, files, name="{stem}")


def segment(case: SceneCase, name: str):
    segmentation = case.segmentation.GetSegmentation()
    return segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(name))


def save_and_reload(scene, case: SceneCase, path) -> SceneCase:
    """The case's segmentation written and read back by Slicer's own storage node."""
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.WriteData(case.segmentation)
    scene.RemoveNode(storage)
    return SceneCase(case.volume, load_segmentation(scene, path, "reloaded", case.volume))


def test_segments_are_matched_by_code_before_names(case_files, tmp_path):
    scene, _ = new_scene()
    cases = scene_cases(scene, case_files)
    segment(cases[1], "kidney_right").SetName("Niere rechts")  # renamed, still coded
    segment(cases[1], "liver").SetName("Leber")
    segment(cases[1], "Leber").RemoveTag("TerminologyEntry")  # neither coded nor known by name
    assert plan_labels(cases, STRUCTURES).missing == {"slab1": ["liver"]}
    plan = plan_labels(cases, STRUCTURES, aliases={"liver": ["Leber"]})
    assert plan.problems == []
    export_training_set(cases[:1], tmp_path / "ds", STRUCTURES)
    training_set = TrainingSet(tmp_path / "ds")
    data = json.loads((tmp_path / "ds" / "dataset.json").read_text(encoding="utf-8"))
    data["mtkd"] = {"aliases": {"liver": ["Leber"]}}  # the dataset's alias table
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps(data), encoding="utf-8")
    case_id = training_set.add(cases[1])
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ds" / "labelsTr" /
                                                        f"{case_id}.nii.gz")))  # fmt: skip
    source = sitk.GetArrayFromImage(sitk.ReadImage(str(case_files[1][1])))
    assert np.array_equal(written, source)  # liver 1, spleen 2, kidney_right 3 as in the file
    assert load_dataset(tmp_path / "ds").aliases == {"liver": ("Leber",)}


def test_a_structure_marked_not_annotated(case_files, tmp_path):
    scene, _ = new_scene()
    cases = scene_cases(scene, case_files)
    spleen_id = cases[1].segmentation.GetSegmentation().GetSegmentIdBySegmentName("spleen")
    set_not_annotated(cases[1].segmentation, spleen_id)  # drawn in part, say: not to be trusted
    reloaded = save_and_reload(scene, cases[1], tmp_path / "marked.seg.nrrd")
    assert is_not_annotated(segment(reloaded, "spleen"))  # the mark is saved with the file
    assert not is_not_annotated(segment(reloaded, "liver"))
    kidney = reloaded.segmentation.GetSegmentation().GetSegmentIdBySegmentName("kidney_right")
    reloaded.segmentation.GetSegmentation().RemoveSegment(kidney)
    assert plan_labels([reloaded], STRUCTURES).missing == {"slab1": ["kidney_right"]}
    add_not_annotated_segment(reloaded.segmentation, "kidney_right")
    match = match_case(reloaded.segmentation, STRUCTURES)
    assert match.not_annotated == ["spleen", "kidney_right"] and list(match.segment_ids) == [
        "liver"
    ]
    assert segment(reloaded, "kidney_right").GetTerminology().count("SCT^64033007^Kidney") == 1

    export_training_set(cases[:1], tmp_path / "ds", STRUCTURES)
    case_id = TrainingSet(tmp_path / "ds").add(reloaded)
    dataset = load_dataset(tmp_path / "ds")
    assert dataset.case(case_id).not_annotated == ("spleen", "kidney_right")
    assert dataset.case("slab0").not_annotated == ()
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset.case(case_id).label)))
    assert sorted(np.unique(written).tolist()) == [0, 1]  # the spleen's voxels are not drawn
    set_not_annotated(reloaded.segmentation, spleen_id, False)
    assert match_case(reloaded.segmentation, STRUCTURES).not_annotated == ["kidney_right"]


def test_the_panel_marks_a_structure_not_annotated(case_files):
    """MTKD Train's "Not annotated..." marks the segment that matches the structure, or adds
    an empty marked one; a structure the training set lacks is refused."""
    scene, _ = new_scene()
    (case,) = scene_cases(scene, case_files[1:2])
    segmentation = case.segmentation.GetSegmentation()
    liver = segmentation.GetSegmentIdBySegmentName("liver")
    segmentation.GetSegment(liver).SetName("Liver tissue")  # matched by its code, not its name
    assert mark_not_annotated(case.segmentation, "liver", STRUCTURES) == liver
    assert is_not_annotated(segmentation.GetSegment(liver))
    segmentation.RemoveSegment(segmentation.GetSegmentIdBySegmentName("kidney_right"))
    count = segmentation.GetNumberOfSegments()
    added = mark_not_annotated(case.segmentation, "kidney_right", STRUCTURES)
    assert segmentation.GetNumberOfSegments() == count + 1
    assert is_not_annotated(segmentation.GetSegment(added))
    assert match_case(case.segmentation, STRUCTURES).not_annotated == ["liver", "kidney_right"]
    with pytest.raises(ValueError, match="not a structure of the training set"):
        mark_not_annotated(case.segmentation, "pancreas", STRUCTURES)


def test_an_ambiguous_case_is_refused(case_files, tmp_path):
    scene, _ = new_scene()
    cases = scene_cases(scene, case_files)
    spleen = segment(cases[1], "spleen")
    spleen.SetName("liver (old)")
    spleen.SetTerminology(segment(cases[1], "liver").GetTerminology())  # two livers by code
    plan = plan_labels(cases, STRUCTURES)
    assert len(plan.ambiguous) == 1 and "slab1" in plan.ambiguous[0]
    assert "'liver'" in plan.ambiguous[0] and "'liver (old)'" in plan.ambiguous[0]
    export_training_set(cases[:1], tmp_path / "ds", STRUCTURES)
    with pytest.raises(ValueError, match="liver \\(old\\)"):
        TrainingSet(tmp_path / "ds").add(cases[1])
    assert TrainingSet(tmp_path / "ds").case_ids() == ["slab0"]  # nothing half written


def test_the_training_set_reads_nnunet_v2_labels(tmp_path):
    folder = write_nnunet_v2(tmp_path / "Dataset017", not_annotated={"abd_001": ["spleen"]})
    training_set = TrainingSet(folder)
    assert training_set.structures() == NNUNET_STRUCTURES  # {"background": 0, "liver": 1, ...}
    assert training_set.aliases() == {}
