"""Run a student model on a CT volume node; the result is a segmentation node (no Qt).

The model runs as an ``mtkd segment`` job, in a process of its own or on the session's
long-lived worker (``SegmentLogic(scene, worker=...)``, :mod:`MTKDLib.worker`), on the volume
written with its exact geometry, so the result is voxel for voxel what the command line gives
for the same file, the GUI thread never blocks, and cancelling leaves the scene as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from MTKDLib.devices import check_device
from MTKDLib.mrml_io import load_segmentation, write_volume
from MTKDLib.process import EngineLogic, EngineTask


def check_volume(volume_node: Any) -> None:
    """ValueError unless ``volume_node`` is a scalar volume node holding an image."""
    if volume_node is None:
        raise ValueError("select a CT volume first")
    if not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.IsA(
        "vtkMRMLLabelMapVolumeNode"
    ):
        raise ValueError(f"'{volume_node.GetName()}' is not a scalar (CT) volume")
    image = volume_node.GetImageData()
    if image is None or min(image.GetDimensions()) < 1:
        raise ValueError(f"volume '{volume_node.GetName()}' holds no image data")
    if image.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"volume '{volume_node.GetName()}' has several components; CT has one")


# On the worker: the faster of torch and ONNX Runtime on the CPU (torch on a GPU), the first
# Applies running torch while the two are compared in the background. A process per Apply
# runs torch: comparing them there would cost each Apply its time.
WORKER_BACKEND = "auto"


class SegmentLogic(EngineLogic):
    """Segments volume nodes of ``scene`` with a model (any source the engine opens)."""

    def start(
        self,
        volume_node: Any,
        model: str | Path,
        device: str = "auto",
        model_name: str | None = None,
        keep_largest: bool = False,
    ) -> EngineTask[Any]:
        """Start segmenting; poll the returned task, whose result is the new segmentation
        node (named ``"<volume> <model>"``, under the volume in the subject hierarchy).
        ``keep_largest``: every structure keeps only its largest connected part (off: the
        post-processing the model chose on its validation cases, as ``mtkd segment``)."""
        check_volume(volume_node)
        check_device(device)
        name = f"{volume_node.GetName()} {model_name or Path(model).name}"
        backend = WORKER_BACKEND if self.worker is not None else "torch"

        def prepare(workdir: Path) -> list[str]:
            image = write_volume(volume_node, workdir / "input.nrrd")
            output = workdir / "segmentation.seg.nrrd"
            command = ["segment", str(model), str(image), "-o", str(output), "--device",
                       device, "--progress", "--backend", backend]  # fmt: skip
            return [*command, "--keep-largest"] if keep_largest else command

        def collect(workdir: Path) -> Any:
            return load_segmentation(
                self.scene, workdir / "segmentation.seg.nrrd", name, volume_node
            )

        return self.task(prepare, collect)

    def segment(
        self, volume_node: Any, model: str | Path, device: str = "auto", **options: Any
    ) -> Any:
        """Blocking :meth:`start` (for scripts and tests, never on Slicer's GUI thread): the
        new segmentation node."""
        return self.start(volume_node, model, device, **options).wait()
