"""A headless Slicer scene (``slicer-core``: real MRML and module logic, no Qt), wired the way
the application wires it at start-up, for testing the modules' logic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import slicer

LOGIC_CLASSES = {
    "Segmentations": "vtkSlicerSegmentationsModuleLogic",
    "SubjectHierarchy": "vtkSlicerSubjectHierarchyModuleLogic",
    "Terminologies": "vtkSlicerTerminologiesModuleLogic",
    "Tables": "vtkSlicerTablesLogic",
    "Plots": "vtkSlicerPlotsLogic",
    "Volumes": "vtkSlicerVolumesLogic",
}


def new_scene() -> tuple[Any, dict[str, Any]]:
    """A scene with Slicer's application logic and the module logics the modules use."""
    scene = slicer.vtkMRMLScene()
    application = slicer.vtkSlicerApplicationLogic()
    application.SetMRMLScene(scene)
    logics = {"Application": application}
    for name, class_name in LOGIC_CLASSES.items():
        logic = getattr(slicer, class_name)()
        logic.SetMRMLApplicationLogic(application)
        logic.SetMRMLScene(scene)
        logics[name] = logic
    return scene, logics


def load_volume(scene: Any, path: str | Path, name: str | None = None) -> Any:
    """A scalar volume node read by Slicer's own volume storage node."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or Path(path).name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"Slicer could not read {path}"
    scene.RemoveNode(storage)
    return node


def write_slab_cases(
    data: Path, folder: Path, starts: list[int], structures: list[str]
) -> list[tuple[Path, Path]]:
    """6-slice slabs of the bundled real abdomen CT, starting at the axial slices ``starts``,
    as NRRD files with their TotalSegmentator labels of ``structures`` as coded ``.seg.nrrd``:
    [(ct, segmentation)]."""
    import SimpleITK as sitk

    from mtkd.data.labels import LabelTable, remap_label_array
    from mtkd.data.segnrrd import write_segmentation

    image = sitk.ReadImage(str(data / "abdomen_ct.nii.gz"))
    labels = sitk.ReadImage(str(data / "abdomen_seg_total_fast.nii.gz"))
    table, mapping = LabelTable.from_json(data / "labels_total_v2.json").select(structures)
    files = []
    for index, start in enumerate(starts):
        size, corner = [image.GetSize()[0], image.GetSize()[1], 6], [0, 0, start]
        seg = sitk.RegionOfInterest(labels, size, corner)
        seg_image = sitk.GetImageFromArray(remap_label_array(sitk.GetArrayFromImage(seg), mapping))
        seg_image.CopyInformation(seg)
        ct_path, seg_path = folder / f"slab{index}.nrrd", folder / f"slab{index}.seg.nrrd"
        sitk.WriteImage(sitk.RegionOfInterest(image, size, corner), str(ct_path))
        write_segmentation(seg_image, table, seg_path)
        files.append((ct_path, seg_path))
    return files


def scene_cases(scene: Any, files: list[tuple[Path, Path]], name: str = "{stem} labels") -> list:
    """Each (CT, segmentation) file pair loaded into ``scene`` as a training-set case, the
    segmentation node named by ``name`` (``{stem}``: the CT file's stem)."""
    from MTKDLib.mrml_io import load_segmentation
    from MTKDLib.training_set import SceneCase

    cases = []
    for ct_path, seg_path in files:
        volume = load_volume(scene, ct_path, ct_path.stem)
        segmentation = load_segmentation(scene, seg_path, name.format(stem=ct_path.stem), volume)
        cases.append(SceneCase(volume, segmentation))
    return cases
