"""A PNG of axial, coronal and sagittal CT slices with the teacher's and the student's contours.

Slices are cut after reorienting to the nearest axis-aligned LPS grid and shown in radiological
convention: patient left on the image right (axial, coronal), anterior at the top (axial) or on
the left (sagittal), superior at the top (coronal, sagittal), with square millimetres (pixel
aspect from the spacing). matplotlib (the ``plot`` extra) is imported only when drawing.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from mtkd.data.atomic import atomic_path
from mtkd.data.image_io import check_same_grid
from mtkd.errors import MTKDError

__all__ = ["Panel", "slice_panels", "structure_colors", "write_contour_png"]

SOFT_TISSUE_WINDOW = (-160.0, 240.0)  # level 40 HU, width 400 HU
_GOLDEN = 0.618033988749895
_LEGEND_STRUCTURES = 22  # structures named in the legend at most (the largest in the slices)
_EDGE_POSITIONS = {
    "left": (0.01, 0.5),
    "right": (0.99, 0.5),
    "top": (0.5, 0.99),
    "bottom": (0.5, 0.01),
}
CAPTION = (
    "Radiological convention: patient left is on the image right (axial, coronal); "
    "sagittal: anterior on the left. Superior at the top. "
    "CT window level 40 / width 400 HU."
)


def structure_colors(count: int, saturation: float = 0.85, value: float = 0.95) -> list:
    """``count`` distinct RGB colours (0..1), hues spread by the golden ratio."""
    return [
        colorsys.hsv_to_rgb((0.05 + index * _GOLDEN) % 1.0, saturation, value)
        for index in range(count)
    ]


@dataclass
class Panel:
    """One displayed slice: CT and label arrays (rows top to bottom), pixel aspect, edges."""

    title: str
    ct: np.ndarray
    labels: list[np.ndarray]
    aspect: float  # pixel height / pixel width (mm / mm)
    edges: dict[str, str]  # "left", "right", "top", "bottom" -> patient direction letter


def _oriented_array(image: sitk.Image) -> np.ndarray:
    """Array (z, y, x) with x towards patient left, y posterior, z superior (nearest axes)."""
    return sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))


def _centroid(labels: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """Index centroid (z, y, x) of the voxels labelled in any map; the middle if none is."""
    union = np.zeros(shape, dtype=bool)
    for array in labels:
        union |= array > 0
    total = int(union.sum())
    if total == 0:
        return (np.array(shape) - 1) / 2
    others = {0: (1, 2), 1: (0, 2), 2: (0, 1)}
    return np.array(
        [float(np.arange(shape[axis]) @ union.sum(axis=others[axis])) / total for axis in range(3)]
    )


def _offset(coordinate: float, positive: str, negative: str) -> str:
    """A slice position as Slicer shows it, e.g. ``S 94.3 mm`` or ``R 12.0 mm``."""
    return f"{positive if coordinate >= 0 else negative} {abs(coordinate):.1f} mm"


def slice_panels(
    image: sitk.Image, label_maps: Sequence[sitk.Image], centre: Sequence[int] | None = None
) -> list[Panel]:
    """Axial, coronal and sagittal panels through ``centre`` (z, y, x indices of the volume
    reoriented to LPS), titled with the slice positions in patient coordinates.

    Without ``centre`` the slices pass through the centroid of all labelled voxels (the middle
    of the volume when there are none).
    """
    oriented = sitk.DICOMOrient(image, "LPS")
    spacing_x, spacing_y, spacing_z = oriented.GetSpacing()
    ct = sitk.GetArrayFromImage(oriented)
    labels = [_oriented_array(label) for label in label_maps]
    if centre is None:
        centre = _centroid(labels, ct.shape)
    z, y, x = (int(np.clip(round(float(c)), 0, n - 1)) for c, n in zip(centre, ct.shape))
    left, posterior, superior = oriented.TransformIndexToPhysicalPoint((x, y, z))
    return [
        Panel(
            f"axial, {_offset(superior, 'S', 'I')}",
            ct[z],
            [array[z] for array in labels],
            spacing_y / spacing_x,
            {"left": "R", "right": "L", "top": "A", "bottom": "P"},
        ),
        Panel(
            f"coronal, {_offset(posterior, 'P', 'A')}",
            ct[::-1, y, :],
            [array[::-1, y, :] for array in labels],
            spacing_z / spacing_x,
            {"left": "R", "right": "L", "top": "S", "bottom": "I"},
        ),
        Panel(
            f"sagittal, {_offset(left, 'L', 'R')}",
            ct[::-1, :, x],
            [array[::-1, :, x] for array in labels],
            spacing_z / spacing_y,
            {"left": "A", "right": "P", "top": "S", "bottom": "I"},
        ),
    ]


def _matplotlib(path: Path):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError:
        raise MTKDError(
            "drawing the picture needs matplotlib: install the plot extra "
            "(pip install 'mtkd[plot]')",
            path,
        ) from None
    return FigureCanvasAgg, Figure, Line2D


def write_contour_png(
    image: sitk.Image,
    teacher_labels: sitk.Image,
    student_labels: sitk.Image,
    path: str | Path,
    names: Sequence[str],
    *,
    teacher_name: str = "teacher",
    student_name: str = "student",
    size_inches: tuple[float, float] = (15.0, 6.0),
    dpi: int = 100,
) -> Path:
    """Draw the three panels with teacher contours solid and student contours dashed.

    Label value ``k`` of both maps is structure ``names[k - 1]`` and gets ``k``-th colour of
    :func:`structure_colors`. The PNG is ``size_inches * dpi`` pixels, written atomically.
    """
    path = Path(path)
    canvas_class, figure_class, line_class = _matplotlib(path)
    for role, label in (("teacher", teacher_labels), ("student", student_labels)):
        try:
            check_same_grid(label, image, path)
        except MTKDError as error:
            raise MTKDError(f"{role} label map: {error.problem}", path) from None
    colors = structure_colors(len(names))
    panels = slice_panels(image, [teacher_labels, student_labels])
    figure = figure_class(figsize=size_inches, dpi=dpi)
    canvas_class(figure)
    figure.subplots_adjust(left=0.02, right=0.98, top=0.88, bottom=0.2, wspace=0.08)
    axes = figure.subplots(1, len(panels))
    shown: dict[int, int] = {}  # label value -> contoured pixels over the panels
    for ax, panel in zip(axes, panels):
        ax.imshow(
            panel.ct,
            cmap="gray",
            vmin=SOFT_TISSUE_WINDOW[0],
            vmax=SOFT_TISSUE_WINDOW[1],
            aspect=panel.aspect,
            interpolation="nearest",
        )
        for labels, style in zip(panel.labels, ("solid", "dashed")):
            for value in np.unique(labels):
                if value == 0 or value > len(names):
                    continue
                mask = (labels == value).astype(np.uint8)
                ax.contour(
                    mask,
                    levels=[0.5],
                    colors=[colors[value - 1]],
                    linewidths=1.3,
                    linestyles=style,
                )
                shown[int(value)] = shown.get(int(value), 0) + int(mask.sum())
        ax.set_title(panel.title, fontsize="medium")
        for where, (px, py) in _EDGE_POSITIONS.items():
            ax.text(
                px,
                py,
                panel.edges[where],
                transform=ax.transAxes,
                color="yellow",
                ha={"left": "left", "right": "right"}.get(where, "center"),
                va={"top": "top", "bottom": "bottom"}.get(where, "center"),
                fontsize="small",
                fontweight="bold",
            )
        ax.set_axis_off()
    handles = [
        line_class([], [], color="0.3", linestyle="solid", label=f"teacher: {teacher_name}"),
        line_class([], [], color="0.3", linestyle="dashed", label=f"student: {student_name}"),
    ]
    largest = sorted(shown, key=shown.__getitem__, reverse=True)[:_LEGEND_STRUCTURES]
    handles += [
        line_class([], [], color=colors[value - 1], linewidth=3, label=names[value - 1])
        for value in sorted(largest)
    ]
    if len(shown) > len(largest):
        more = f"+ {len(shown) - len(largest)} smaller structures"
        handles.append(line_class([], [], linestyle="none", label=more))
    figure.legend(
        handles=handles,
        loc="lower center",
        bbox_to_anchor=(0.5, 0.05),
        ncol=min(len(handles), 8),
        fontsize="small",
        frameon=False,
    )
    figure.suptitle(f"{teacher_name} (solid) vs {student_name} (dashed)")
    figure.text(0.5, 0.01, CAPTION, ha="center", va="bottom", fontsize="small")
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=dpi)
    return path
