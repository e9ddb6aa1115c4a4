"""Draw the extension and module icons (128x128 RGBA PNGs) from scratch.

    python Resources/Icons/draw_icons.py

writes, relative to the repository root:
    Resources/Icons/MTKD.png                     teacher -> student at three scales, on a CT slice
    MTKDSegment/Resources/Icons/MTKDSegment.png  the student over a segmented CT slice
    MTKDTrain/Resources/Icons/MTKDTrain.png      teacher -> student with a falling loss curve

Shapes are flat colours drawn at 4x and scaled down, so the output is the same on every run.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[2]
SIZE = 128
SCALE = 4  # supersampling factor; drawing coordinates below are in 128-px units

CT_RIM = (38, 50, 56, 255)
CT_BODY = (84, 98, 106, 255)
CT_BONE = (214, 222, 226, 255)
TEACHER = (30, 116, 208, 255)
STUDENT = (245, 140, 20, 255)
FEATURE = (255, 255, 255, 235)
ARROW = (255, 236, 140, 255)
OUTLINE = (20, 28, 32, 255)
LIVER = (221, 130, 101)
SPLEEN = (157, 108, 162)
KIDNEY = (185, 102, 83)
PANEL = (250, 250, 250, 255)
CURVE = (220, 50, 47, 255)


def _s(*values: float) -> list[float]:
    """128-px units to canvas pixels."""
    return [v * SCALE for v in values]


def new_canvas() -> Image.Image:
    return Image.new("RGBA", (SIZE * SCALE, SIZE * SCALE), (0, 0, 0, 0))


def finish(canvas: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.resize((SIZE, SIZE), Image.Resampling.LANCZOS).save(path, format="PNG")
    print(f"wrote {path.relative_to(ROOT)}")


def ct_slice(draw: ImageDraw.ImageDraw, vertebra: tuple[float, float] = (69, 100)) -> None:
    """An axial CT slice: dark field of view, body outline, a vertebra centred at `vertebra`."""
    draw.ellipse(_s(3, 3, 125, 125), fill=CT_RIM)
    draw.ellipse(_s(14, 26, 114, 108), fill=CT_BODY)
    vx, vy = vertebra
    draw.ellipse(_s(vx - 7, vy - 6, vx + 7, vy + 6), fill=CT_BONE)


def blob(
    centre: tuple[float, float], rx: float, ry: float, angle_deg: float, n: int = 48
) -> list[float]:
    """Points of a tilted ellipse slightly flattened on one side (an organ outline)."""
    cx, cy = centre
    a = math.radians(angle_deg)
    points: list[float] = []
    for i in range(n):
        t = 2 * math.pi * i / n
        x, y = rx * math.cos(t), ry * math.sin(t) * (0.8 if math.sin(t) > 0 else 1.0)
        points += [cx + x * math.cos(a) - y * math.sin(a), cy + x * math.sin(a) + y * math.cos(a)]
    return points


def network_block(
    draw: ImageDraw.ImageDraw,
    box: tuple[float, float, float, float],
    colour: tuple[int, int, int, int],
    levels: list[float],
    widths: list[float],
    bar: float,
) -> None:
    """A rounded block with one feature bar per scale (wide at the top, narrow below)."""
    x0, y0, x1, y1 = box
    radius = min(x1 - x0, y1 - y0) * 0.18
    draw.rounded_rectangle(_s(x0, y0, x1, y1), radius=radius * SCALE, fill=colour)
    draw.rounded_rectangle(
        _s(x0, y0, x1, y1), radius=radius * SCALE, outline=OUTLINE, width=int(1.5 * SCALE)
    )
    cx = (x0 + x1) / 2
    for y, w in zip(levels, widths, strict=True):
        draw.rounded_rectangle(
            _s(cx - w / 2, y - bar / 2, cx + w / 2, y + bar / 2),
            radius=bar / 2 * SCALE,
            fill=FEATURE,
        )


def arrow(
    draw: ImageDraw.ImageDraw,
    start: tuple[float, float],
    end: tuple[float, float],
    width: float = 4.5,
    head: float = 9.0,
    colour: tuple[int, int, int, int] = ARROW,
) -> None:
    """A straight arrow from start to end (the tip touches end)."""
    (xa, ya), (xb, yb) = start, end
    length = ((xb - xa) ** 2 + (yb - ya) ** 2) ** 0.5
    ux, uy = (xb - xa) / length, (yb - ya) / length
    bx, by = xb - ux * head, yb - uy * head  # base of the head
    draw.line(_s(xa, ya, bx + ux, by + uy), fill=colour, width=int(width * SCALE))
    half = head * 0.62
    draw.polygon(
        _s(xb, yb, bx - uy * half, by + ux * half, bx + uy * half, by - ux * half),
        fill=colour,
    )


def teacher_student_pair(draw: ImageDraw.ImageDraw, arrows: bool = True) -> None:
    teacher_levels = [40.0, 64.0, 88.0]
    student_levels = [50.0, 64.0, 78.0]
    network_block(draw, (10, 22, 56, 106), TEACHER, teacher_levels, [34, 26, 18], 7)
    network_block(draw, (84, 38, 116, 90), STUDENT, student_levels, [22, 16, 10], 5)
    if arrows:
        for yt, ys in zip(teacher_levels, student_levels, strict=True):
            arrow(draw, (58, yt), (83, ys))


def draw_extension_icon() -> Image.Image:
    canvas = new_canvas()
    draw = ImageDraw.Draw(canvas)
    ct_slice(draw)
    teacher_student_pair(draw)
    return canvas


def draw_segment_icon() -> Image.Image:
    canvas = new_canvas()
    draw = ImageDraw.Draw(canvas)
    ct_slice(draw, vertebra=(60, 96))
    # Segmentation overlay as Slicer shows it, a translucent fill inside a solid outline:
    # liver (image left = patient right), spleen, kidneys.
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    odraw = ImageDraw.Draw(overlay)
    organs = [
        (blob((40, 52), 24, 16, -25), LIVER),
        (blob((95, 54), 10, 14, 20), SPLEEN),
        (blob((40, 82), 7, 10, 15), KIDNEY),
        (blob((80, 82), 7, 10, -15), KIDNEY),
    ]
    for points, colour in organs:
        odraw.polygon(_s(*points), fill=(*colour, 215))
    canvas.alpha_composite(overlay)
    draw = ImageDraw.Draw(canvas)
    for points, colour in organs:
        pts = _s(*points)
        draw.line([*pts, pts[0], pts[1]], fill=(*colour, 255), width=int(2 * SCALE), joint="curve")
    # The student that drew it, in the lower right corner.
    network_block(draw, (84, 76, 122, 120), STUDENT, [87.0, 98.0, 109.0], [26, 19, 12], 6)
    return canvas


def draw_train_icon() -> Image.Image:
    canvas = new_canvas()
    draw = ImageDraw.Draw(canvas)
    ct_slice(draw)
    network_block(draw, (8, 16, 48, 70), TEACHER, [28.0, 43.0, 58.0], [30, 22, 14], 6)
    network_block(draw, (88, 26, 116, 62), STUDENT, [35.0, 44.0, 53.0], [20, 14, 8], 4)
    arrow(draw, (51, 43), (86, 43), width=5, head=10)
    # Loss curve on a small panel below.
    draw.rounded_rectangle(_s(24, 76, 104, 116), radius=5 * SCALE, fill=PANEL)
    draw.rounded_rectangle(
        _s(24, 76, 104, 116), radius=5 * SCALE, outline=OUTLINE, width=int(1.5 * SCALE)
    )
    draw.line(_s(32, 82, 32, 110, 98, 110), fill=OUTLINE, width=int(2 * SCALE))
    points: list[float] = []
    for i in range(25):
        t = i / 24
        x = 34 + 62 * t
        y = 108 - 24 * (0.12 + 0.88 * (1 - t) ** 3)  # falls fast, then flattens
        points += [x, y]
    draw.line(_s(*points), fill=CURVE, width=int(3 * SCALE), joint="curve")
    return canvas


def main() -> None:
    finish(draw_extension_icon(), ROOT / "Resources" / "Icons" / "MTKD.png")
    finish(draw_segment_icon(), ROOT / "MTKDSegment" / "Resources" / "Icons" / "MTKDSegment.png")
    finish(draw_train_icon(), ROOT / "MTKDTrain" / "Resources" / "Icons" / "MTKDTrain.png")


if __name__ == "__main__":
    main()
