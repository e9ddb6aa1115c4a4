"""Teacher against student on a CT volume node: a per-structure table, each model's time and
memory, a disagreement segmentation and both models' segmentations (no Qt).

The teacher is any model source the engine opens (our run, a MONAI bundle, TorchScript) or an
existing segmentation node, e.g. a TotalSegmentator result; structures are matched by name.
The engine runs an ``mtkd compare`` job, in a process of its own or on the session's worker
(``CompareLogic(scene, worker=...)``, :mod:`MTKDLib.worker`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from MTKDLib.devices import check_device
from MTKDLib.mrml_io import labels_file, load_segmentation, table_node, write_labelmap
from MTKDLib.mrml_io import write_volume as write_volume_file
from MTKDLib.process import EngineLogic, EngineTask
from MTKDLib.segment_logic import check_volume

STRUCTURE_COLUMNS = [
    ("Structure", "string", "structure"),
    ("Dice teacher-student", "double", "dice_teacher_student"),
    ("HD95 teacher-student (mm)", "double", "hd95_teacher_student_mm"),
    ("Teacher volume (mL)", "double", "volume_teacher_ml"),
    ("Student volume (mL)", "double", "volume_student_ml"),
    ("Teacher only (mL)", "double", "teacher_only_ml"),
    ("Student only (mL)", "double", "student_only_ml"),
]
REFERENCE_COLUMNS = [
    ("Dice teacher-reference", "double", "dice_teacher_reference"),
    ("Dice student-reference", "double", "dice_student_reference"),
    ("HD95 teacher-reference (mm)", "double", "hd95_teacher_reference_mm"),
    ("HD95 student-reference (mm)", "double", "hd95_student_reference_mm"),
    ("Reference volume (mL)", "double", "volume_reference_ml"),
]
MODEL_COLUMNS = [
    ("Role", "string", "role"),
    ("Model", "string", "name"),
    ("Time (s)", "double", "seconds"),
    ("Peak memory (MB)", "double", "peak_memory_mb"),
    ("Parameters", "double", "parameters"),
    ("Plan", "string", "plan"),
]


@dataclass
class ComparisonNodes:
    """The nodes a comparison adds, and the engine's ``comparison.json`` content."""

    structures: Any  # vtkMRMLTableNode, one row per common structure
    models: Any  # vtkMRMLTableNode, one row per model: time, peak memory, parameters
    disagreement: Any  # vtkMRMLSegmentationNode: "<structure> teacher only" / "student only"
    student: Any  # vtkMRMLSegmentationNode
    teacher: Any | None  # None when the teacher was already a segmentation node
    summary: dict[str, Any]


def _rows(items: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> list[list[Any]]:
    return [[item.get(key) for _, _, key in columns] for item in items]


def _model_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for role in ("teacher", "student"):
        run = dict(summary[role])
        peak = run.get("peak_memory_bytes")
        run["peak_memory_mb"] = None if peak is None else peak / 2**20
        run["role"] = role
        rows.append(run)
    return rows


class CompareLogic(EngineLogic):
    """Compares a teacher with a student on volume nodes of ``scene``."""

    def start(
        self,
        volume_node: Any,
        student: str | Path,
        teacher: str | Path | Any,
        device: str = "auto",
        reference: Any | None = None,
    ) -> EngineTask[ComparisonNodes]:
        """Start the comparison; poll the returned task, whose result is the
        :class:`ComparisonNodes`. ``teacher``: a model path or a segmentation node;
        ``reference``: an optional segmentation node scored against both."""
        check_volume(volume_node)
        check_device(device)
        teacher_is_node = not isinstance(teacher, (str, Path))
        if teacher_is_node and (teacher is None or not teacher.IsA("vtkMRMLSegmentationNode")):
            raise ValueError("the teacher must be a model or a segmentation node")
        volume_name = volume_node.GetName()

        def prepare(workdir: Path) -> list[str]:
            image = write_volume_file(volume_node, workdir / "input.nrrd")
            args = ["compare", str(image), "--student", str(student)]
            if teacher_is_node:
                path = workdir / "teacher_labels.nrrd"
                write_labelmap(teacher, volume_node, path)
                args += ["--teacher", str(path), "--teacher-labels", str(labels_file(path))]
            else:
                args += ["--teacher", str(teacher)]
            if reference is not None:
                path = workdir / "reference_labels.nrrd"
                write_labelmap(reference, volume_node, path)
                args += ["--reference", str(path), "--reference-labels", str(labels_file(path))]
            out = workdir / "comparison"
            return [*args, "-o", str(out), "--save-segmentations", "--device", device,
                    "--progress"]  # fmt: skip

        def collect(workdir: Path) -> ComparisonNodes:
            out = workdir / "comparison"
            summary = json.loads((out / "comparison.json").read_text())
            return self._add_nodes(out, summary, volume_node, volume_name, teacher_is_node)

        return self.task(prepare, collect)

    def compare(self, volume_node: Any, student: str | Path, teacher: Any, **options: Any):
        """Blocking :meth:`start` (for scripts and tests, never on Slicer's GUI thread): the
        :class:`ComparisonNodes`."""
        return self.start(volume_node, student, teacher, **options).wait()

    def _add_nodes(
        self,
        out: Path,
        summary: dict[str, Any],
        volume_node: Any,
        volume_name: str,
        teacher_is_node: bool,
    ) -> ComparisonNodes:
        columns = STRUCTURE_COLUMNS + (REFERENCE_COLUMNS if summary.get("reference") else [])
        added = []
        try:
            structures = table_node(
                self.scene,
                f"{volume_name} teacher vs student",
                [(title, kind) for title, kind, _ in columns],
                _rows(summary["structures"], columns),
            )
            added.append(structures)
            models = table_node(
                self.scene,
                f"{volume_name} model costs",
                [(title, kind) for title, kind, _ in MODEL_COLUMNS],
                _rows(_model_rows(summary), MODEL_COLUMNS),
            )
            added.append(models)
            disagreement = load_segmentation(
                self.scene, out / "disagreement.seg.nrrd", f"{volume_name} disagreement",
                volume_node,
            )  # fmt: skip
            added.append(disagreement)
            student = load_segmentation(
                self.scene,
                out / "student.seg.nrrd",
                f"{volume_name} {summary['student']['name']}",
                volume_node,
            )
            added.append(student)
            teacher = None
            if not teacher_is_node:
                teacher = load_segmentation(
                    self.scene,
                    out / "teacher.seg.nrrd",
                    f"{volume_name} {summary['teacher']['name']} (teacher)",
                    volume_node,
                )
                added.append(teacher)
        except BaseException:
            for node in added:  # all or nothing: the scene stays as it was
                self.scene.RemoveNode(node)
            raise
        return ComparisonNodes(structures, models, disagreement, student, teacher, summary)
