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
