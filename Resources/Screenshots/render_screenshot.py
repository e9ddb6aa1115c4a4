"""Render the Extensions Manager screenshot (``MTKD_demo.png``) from a ``mtkd demo`` folder.

The picture shows what the demo produces, not Slicer's window: the bundled abdominal CT with
the distilled student's segmentation (``abdomen_student.seg.nrrd``, its segment names and
colours) in an axial and a coronal slice, the same segments as surfaces in a 3-D view, and the
student's training curves from ``student_kd/events.jsonl``. Slices and plots are drawn with
matplotlib; the 3-D view is rendered offscreen with VTK (the ``vtk`` that ``slicer-core``
installs; it needs an EGL or OSMesa library, which headless Linux machines usually have).

Reproduce it (about 5 minutes on a 2-core CPU for the demo)::

    .venv/bin/mtkd demo --output runs/demo
    .venv/bin/python Resources/Screenshots/render_screenshot.py runs/demo

Options: ``--ct`` for a CT other than the bundled one (the one the demo segmented), ``-o`` for
another output file. The PNG is written with a 256-colour palette so that it stays small.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import matplotlib
import numpy as np
import SimpleITK as sitk

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the offscreen backend)

ROOT = Path(__file__).resolve().parents[2]
BUNDLED_CT = ROOT / "Testing" / "Data" / "abdomen_ct.nii.gz"
OUTPUT = Path(__file__).resolve().parent / "MTKD_demo.png"
SEGMENTATION = "abdomen_student.seg.nrrd"
HU_WINDOW = (-160.0, 240.0)  # the demo's abdominal window
BACKGROUND = "#1b1b1b"
TEXT = "#e8e8e8"


def read_segments(path: Path) -> tuple[sitk.Image, list[tuple[int, str, tuple]]]:
    """The label map of a single-layer ``.seg.nrrd`` and its (value, name, rgb) segments."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    image = reader.Execute()
    fields: dict[int, dict[str, str]] = {}
    for key in reader.GetMetaDataKeys():
        if key.startswith("Segment") and "_" in key:
            index, _, name = key[len("Segment") :].partition("_")
            if index.isdigit():
                fields.setdefault(int(index), {})[name] = reader.GetMetaData(key)
    segments = [
        (int(f["LabelValue"]), f["Name"], tuple(float(c) for c in f["Color"].split()))
        for _, f in sorted(fields.items())
    ]
    return image, segments


def read_curves(events: Path) -> list[dict]:
    """The per-epoch metrics events of a run's ``events.jsonl``."""
    lines = events.read_text(encoding="utf-8").splitlines()
    return [e for e in map(json.loads, lines) if e.get("type") == "metrics"]


def oriented_arrays(ct: Path, labels: sitk.Image) -> tuple[np.ndarray, np.ndarray, tuple]:
    """CT (HU) and labels as (z, y, x) arrays in LPS order (x: right to left, y: anterior to
    posterior, z: inferior to superior), labels on the CT grid; and the spacing (x, y, z)."""
    image = sitk.DICOMOrient(sitk.ReadImage(str(ct)), "LPS")
    labels = sitk.Resample(labels, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(labels), image.GetSpacing()


def overlay(ct: np.ndarray, labels: np.ndarray, colours: dict[int, tuple]) -> np.ndarray:
    """RGB of a 2-D CT slice in the HU window with the segments blended in (alpha 0.5)."""
    low, high = HU_WINDOW
    grey = np.clip((ct - low) / (high - low), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for value, colour in colours.items():
        mask = labels == value
        rgb[mask] = 0.5 * rgb[mask] + 0.5 * np.asarray(colour)
    return rgb


def render_surfaces(labels: np.ndarray, spacing: tuple, colours: dict, size: int) -> np.ndarray:
    """An anterior 3-D view of each segment's smoothed surface, rendered offscreen by VTK."""
    import vtkmodules.vtkRenderingOpenGL2  # noqa: F401  (registers the OpenGL back end)
    from vtkmodules.util.numpy_support import numpy_to_vtk, vtk_to_numpy
    from vtkmodules.vtkCommonDataModel import vtkImageData
    from vtkmodules.vtkFiltersCore import vtkPolyDataNormals, vtkWindowedSincPolyDataFilter
    from vtkmodules.vtkFiltersGeneral import vtkDiscreteFlyingEdges3D
    from vtkmodules.vtkRenderingCore import (
        vtkActor,
        vtkPolyDataMapper,
        vtkRenderer,
        vtkRenderWindow,
        vtkWindowToImageFilter,
    )

    volume = vtkImageData()
    volume.SetDimensions(labels.shape[2], labels.shape[1], labels.shape[0])
    volume.SetSpacing(*spacing)
    scalars = numpy_to_vtk(np.ascontiguousarray(labels).ravel(), deep=True)
    volume.GetPointData().SetScalars(scalars)
    renderer = vtkRenderer()
    renderer.SetBackground(0.76, 0.76, 0.87)  # the lower colour of Slicer's 3-D view
    for value, colour in colours.items():
        if not (labels == value).any():
            continue
        surface = vtkDiscreteFlyingEdges3D()
        surface.SetInputData(volume)
        surface.SetValue(0, value)
        smooth = vtkWindowedSincPolyDataFilter()
        smooth.SetInputConnection(surface.GetOutputPort())
        smooth.SetNumberOfIterations(20)
        smooth.SetPassBand(0.05)
        smooth.NormalizeCoordinatesOn()
        normals = vtkPolyDataNormals()
        normals.SetInputConnection(smooth.GetOutputPort())
        mapper = vtkPolyDataMapper()
        mapper.SetInputConnection(normals.GetOutputPort())
        mapper.ScalarVisibilityOff()
        actor = vtkActor()
        actor.SetMapper(mapper)
        actor.GetProperty().SetColor(*colour)
        actor.GetProperty().SetSpecular(0.2)
        renderer.AddActor(actor)
    window = vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(size, size)
    window.AddRenderer(renderer)
    camera = renderer.GetActiveCamera()
    centre = np.asarray(volume.GetCenter())
    camera.SetFocalPoint(*centre)
    camera.SetPosition(*(centre + (0.0, -1000.0, 0.0)))  # LPS: -y is anterior
    camera.SetViewUp(0.0, 0.0, 1.0)  # superior up
    renderer.ResetCamera()
    camera.Zoom(1.3)
    window.Render()
    grab = vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.Update()
    output = grab.GetOutput()
    width, height, _ = output.GetDimensions()
    pixels = vtk_to_numpy(output.GetPointData().GetScalars()).reshape(height, width, -1)
    window.Finalize()
    return pixels[::-1, :, :3]  # VTK's rows run bottom to top


def choose_slices(labels: np.ndarray) -> tuple[int, int]:
    """The axial slice that shows the most segments (then the most labelled voxels), and the
    coronal slice through the middle of the labelled voxels."""
    present = np.stack([(labels == v).any(axis=(1, 2)) for v in np.unique(labels) if v]).sum(0)
    counts = (labels > 0).sum(axis=(1, 2))
    axial = int(np.lexsort((counts, present))[-1])
    coronal = int(np.round(np.nonzero(labels)[1].mean()))
    return axial, coronal


def _style(axes: plt.Axes) -> None:
    axes.set_facecolor("#262626")
    axes.tick_params(colors=TEXT, labelsize=9)
    for spine in axes.spines.values():
        spine.set_color("#777777")


def plot_curves(figure: plt.Figure, cell, curves: list[dict], twin: list[dict]) -> None:
    """The student's training losses (log scale) above its validation Dice per epoch, with
    the no-KD twin's Dice when that run is there."""
    top, bottom = cell.subgridspec(2, 1, hspace=0.12, height_ratios=(3, 2)).subplots(sharex=True)
    epochs = [e["epoch"] for e in curves]
    colours = {"loss": "#f5f5f5", "seg": "#ffb74d", "E-E": "#81c784", "B-B": "#e57373"}
    colours.update({"D-D": "#ba68c8", "pmd": "#90a4ae"})
    for key, colour in colours.items():
        if key in curves[0]:
            width = 2.0 if key in ("loss", "seg") else 1.0
            top.plot(epochs, [e[key] for e in curves], color=colour, lw=width, label=key)
    top.set_yscale("log")
    top.set_title("Distilled student: training losses", color=TEXT, fontsize=12)
    top.legend(fontsize=8, ncol=3, facecolor="#333333", edgecolor="#555555", labelcolor=TEXT)
    bottom.plot(epochs, [e["val_dice"] for e in curves], color="#4fc3f7", lw=2, label="distilled")
    if twin:
        no_kd = [e["val_dice"] for e in twin]
        bottom.plot([e["epoch"] for e in twin], no_kd, color="#4fc3f7", ls=":", label="no KD")
        bottom.legend(fontsize=8, facecolor="#333333", edgecolor="#555555", labelcolor=TEXT)
    bottom.set_ylim(0, 1)
    bottom.set_ylabel("validation Dice", color=TEXT, fontsize=10)
    bottom.set_xlabel("epoch", color=TEXT, fontsize=10)
    for axes in (top, bottom):
        _style(axes)


def compose(demo: Path, ct: Path, output: Path) -> Path:
    label_image, segments = read_segments(demo / SEGMENTATION)
    image, labels, spacing = oriented_arrays(ct, label_image)
    colours = {value: colour for value, _, colour in segments}
    curves = read_curves(demo / "student_kd" / "events.jsonl")
    twin = demo / "student_nokd" / "events.jsonl"
    twin_curves = read_curves(twin) if twin.is_file() else []
    axial, coronal = choose_slices(labels)
    sx, sy, sz = spacing

    figure = plt.figure(figsize=(16, 5.2), dpi=100, facecolor=BACKGROUND)
    grid = figure.add_gridspec(1, 4, left=0.01, right=0.965, top=0.88, bottom=0.17, wspace=0.2)

    def view(position: int, title: str) -> plt.Axes:
        axes = figure.add_subplot(grid[0, position])
        axes.set_facecolor("black")
        axes.set_title(title, color=TEXT, fontsize=12)
        axes.set_xticks([])
        axes.set_yticks([])
        return axes

    # radiological display, as Slicer: patient's right on the image's left
    axes = view(0, f"Axial slice {axial}")
    axes.imshow(overlay(image[axial], labels[axial], colours), aspect=sy / sx)
    axes = view(1, f"Coronal slice {coronal}")
    rgb = overlay(image[:, coronal, :], labels[:, coronal, :], colours)[::-1]
    axes.imshow(rgb, aspect=sz / sx)
    axes = view(2, "3-D view (anterior)")
    axes.imshow(render_surfaces(labels, spacing, colours, 520))

    plot_curves(figure, grid[0, 3], curves, twin_curves)

    names = ", ".join(name for _, name, _ in segments)
    metadata = json.loads((demo / "student_kd" / "model" / "mtkd_model.json").read_text())
    figure.suptitle(
        f"MTKD: a small student network ({metadata['parameters'] / 1000:.0f}k parameters), "
        "distilled from a larger teacher, segments an abdominal CT",
        color=TEXT,
        fontsize=15,
    )
    figure.text(
        0.5,
        0.04,
        f"The demo's sample CT; the student's segments: {names}. Drawn from a `mtkd demo` "
        "folder by Resources/Screenshots/render_screenshot.py (not a picture of Slicer's window).",
        color="#bbbbbb",
        fontsize=10,
        ha="center",
    )
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", facecolor=BACKGROUND)
    plt.close(figure)
    from PIL import Image

    buffer.seek(0)
    with Image.open(buffer) as picture:
        small = picture.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)
        output.parent.mkdir(parents=True, exist_ok=True)
        small.save(output, optimize=True)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("demo", type=Path, help="the folder `mtkd demo --output` wrote")
    parser.add_argument("--ct", type=Path, default=BUNDLED_CT, help="the CT the demo segmented")
    parser.add_argument("-o", "--output", type=Path, default=OUTPUT, help="PNG to write")
    args = parser.parse_args(argv)
    path = compose(args.demo, args.ct, args.output)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
