"""MRML nodes to and from the files the engine reads and writes (no Qt).

Only Slicer's own storage nodes and logic are used, so a volume is written with its exact
geometry (spacing, origin, direction) and a ``.seg.nrrd`` comes back with the segment names,
colours and terminology the engine wrote. All functions take the scene explicitly; the
module works on ``slicer.mrmlScene`` in the application and on a headless scene in the tests.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk


def write_volume(volume_node: Any, path: str | Path, compress: bool = False) -> Path:
    """Write a volume node (scalar or labelmap) to ``path`` (``.nrrd``, ``.nii.gz``, ...) with
    its geometry, through Slicer's own volume storage node."""
    path = Path(path)
    scene = volume_node.GetScene()
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    try:
        storage.SetFileName(str(path))
        storage.SetUseCompression(compress)
        if not storage.WriteData(volume_node):
            raise OSError(f"Slicer could not write volume '{volume_node.GetName()}' to {path}")
    finally:
        scene.RemoveNode(storage)
    return path


def place_under(node: Any, parent: Any) -> None:
    """Show ``node`` under ``parent`` in the subject hierarchy (e.g. a result under its CT)."""
    hierarchy = node.GetScene().GetSubjectHierarchyNode()
    if hierarchy is None:
        return
    parent_item = hierarchy.GetItemByDataNode(parent)
    child_item = hierarchy.GetItemByDataNode(node)
    if parent_item and child_item:
        hierarchy.SetItemParent(child_item, parent_item)


def load_segmentation(
    scene: Any, path: str | Path, name: str, reference_volume: Any | None = None
) -> Any:
    """A new segmentation node read from a ``.seg.nrrd`` (names, colours, terminology as in
    the file), on ``reference_volume``'s geometry and under it in the subject hierarchy."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        scene.RemoveNode(storage)
        scene.RemoveNode(node)
        raise OSError(f"Slicer could not read the segmentation {path}")
    scene.RemoveNode(storage)  # the node lives in the scene; the scratch file does not
    node.SetName(name)
    node.CreateDefaultDisplayNodes()
    if reference_volume is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
        place_under(node, reference_volume)
    return node


def segment_names(segmentation_node: Any) -> list[str]:
    """Segment names in the segmentation's order."""
    segmentation = segmentation_node.GetSegmentation()
    return [
        segmentation.GetNthSegment(index).GetName()
        for index in range(segmentation.GetNumberOfSegments())
    ]


def labelmap_array(
    segmentation_node: Any, reference_volume: Any, names: Sequence[str] | None = None
) -> np.ndarray:
    """Label map (k, j, i) on ``reference_volume``'s grid: value n+1 where segment ``names[n]``
    (default: all segments, in order) is; 0 elsewhere."""
    names = list(names) if names is not None else segment_names(segmentation_node)
    segmentation = segmentation_node.GetSegmentation()
    values = {}
    for value, name in enumerate(names, start=1):
        segment_id = segmentation.GetSegmentIdBySegmentName(name)
        if not segment_id:
            raise KeyError(f"no segment named '{name}' in '{segmentation_node.GetName()}'")
        values[segment_id] = value
    return segments_labelmap_array(segmentation_node, reference_volume, values)


def segments_labelmap_array(
    segmentation_node: Any, reference_volume: Any, values: Mapping[str, int]
) -> np.ndarray:
    """Label map (k, j, i) on ``reference_volume``'s grid: ``values[segment id]`` where that
    segment is, 0 elsewhere (a segment drawn over another wins, as in Slicer's export). No
    segments: all zeros."""
    shape = tuple(reversed(reference_volume.GetImageData().GetDimensions()))
    if not values:
        return np.zeros(shape, dtype=np.uint16)
    ids = vtk.vtkStringArray()
    for segment_id in values:
        ids.InsertNextValue(segment_id)
    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        exported = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap, reference_volume
        )
        if not exported:
            raise RuntimeError(f"could not export '{segmentation_node.GetName()}' to a labelmap")
        exported_array = slicer.util.arrayFromVolume(labelmap)
        lookup = np.zeros(len(values) + 1, dtype=np.uint16)
        lookup[1:] = list(values.values())  # the export numbers the segments 1..n in order
        return lookup[exported_array]
    finally:
        scene.RemoveNode(labelmap)


def write_labelmap(
    segmentation_node: Any, reference_volume: Any, path: str | Path
) -> dict[int, str]:
    """Write the segmentation as a label map on ``reference_volume``'s grid (``.nrrd``) and
    its label names next to it (``<path>.labels.json``); returns {value: name}."""
    path = Path(path)
    names = segment_names(segmentation_node)
    array = labelmap_array(segmentation_node, reference_volume, names)
    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        matrix = vtk.vtkMatrix4x4()
        reference_volume.GetIJKToRASMatrix(matrix)
        labelmap.SetIJKToRASMatrix(matrix)
        slicer.util.updateVolumeFromArray(labelmap, array.astype(np.uint16))
        write_volume(labelmap, path)
    finally:
        scene.RemoveNode(labelmap)
    labels = {index + 1: name for index, name in enumerate(names)}
    labels_path = labels_file(path)
    labels_path.write_text(json.dumps({str(k): v for k, v in labels.items()}, indent=2))
    return labels


def labels_file(labelmap_path: str | Path) -> Path:
    """Where :func:`write_labelmap` puts the label names of ``labelmap_path``."""
    labelmap_path = Path(labelmap_path)
    return labelmap_path.with_name(labelmap_path.name + ".labels.json")


def table_node(
    scene: Any, name: str, columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[Any]]
) -> Any:
    """A new table node; ``columns`` are (title, "string"|"double"|"int"), ``rows`` the
    values (None in a number column becomes NaN)."""
    node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = node.GetTable()
    makers = {"string": vtk.vtkStringArray, "double": vtk.vtkDoubleArray, "int": vtk.vtkIntArray}
    arrays = []
    for title, kind in columns:
        array = makers[kind]()
        array.SetName(title)
        table.AddColumn(array)
        arrays.append((array, kind))
    for row in rows:
        for (array, kind), value in zip(arrays, row, strict=True):
            if kind == "string":
                array.InsertNextValue("" if value is None else str(value))
            elif kind == "int":
                array.InsertNextValue(0 if value is None else int(value))
            else:
                array.InsertNextValue(float("nan") if value is None else float(value))
    node.Modified()
    return node
