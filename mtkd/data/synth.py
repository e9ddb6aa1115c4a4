"""Synthetic abdominal CT phantoms written as an MSD cohort (``mtkd synth``).

These are SYNTHETIC volumes, not patient data: each subject is an elliptical body (skin-level
subcutaneous fat, a muscle wall, ribs, a spine with discs and paraspinal muscles, intra-abdominal
fat, bowel and gas pockets) holding organ-like structures of realistic Hounsfield units whose
shape (smoothly deformed, rotated ellipsoids), size, position and texture vary per subject. The
label map is drawn before partial-volume blur (Gaussian) and noise are applied to the image.

Everything is drawn from ``numpy.random.Generator(PCG64(SeedSequence([seed, subject])))``, so
the same ``seed`` gives byte-identical arrays. Geometry is defined relative to the body outline,
which is defined relative to the field of view, so other ``size``/``spacing`` values give the
same anatomy at another resolution.

Image axes are SimpleITK's LPS: +x is the patient's left, +y posterior, +z superior. Arrays are
``(z, y, x)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from mtkd.data.atomic import atomic_write_bytes
from mtkd.data.image_io import write_image
from mtkd.errors import MTKDError

__all__ = [
    "COHORT_NAME",
    "LABELS",
    "NOMINAL_HU",
    "SynthSubject",
    "make_subject",
    "write_cohort",
]

COHORT_NAME = "MTKD synthetic abdominal phantoms (SYNTHETIC, not patient data)"
LABELS = {1: "liver", 2: "spleen", 3: "kidney_left", 4: "kidney_right", 5: "aorta"}
"""Label values and names; earlier structures win where shapes would overlap."""
NOMINAL_HU = {"liver": 60.0, "spleen": 50.0, "kidney_left": 35.0, "kidney_right": 35.0}
"""Typical HU of each structure's interior; the aorta's is drawn per subject (40-200)."""
NOISE_HU = 15.0
BLUR_VOXELS = 0.7
MARKER = "mtkd_synth"
"""Key in dataset.json that marks a folder written by :func:`write_cohort`."""
PREFIX = "synth_"

_AIR, _FAT, _MUSCLE, _BOWEL, _CSF, _DISC = -1000.0, -100.0, 50.0, 30.0, 10.0, 80.0
_CORTEX_MM = 6.0  # kidney cortex: voxels at most this far inside the kidney's surface
_MIN_VOXELS = 20  # every structure must keep at least this many voxels (after erosion by 1)
MIN_SIZE = (48, 40, 16)
"""The smallest grid (x y z voxels) drawn reliably. Near it a draw keeps every structure (the
aorta and the kidneys are a few voxels across there) about one time in three, and a subject is
redrawn up to ``_ATTEMPTS`` times; at 40 voxels in x, 32 in y or 12 slices most draws lose one."""
_ATTEMPTS = 100
MAX_VOXELS = 2**24
"""The largest grid drawn (voxels per phantom): drawing holds about ``BYTES_PER_VOXEL`` bytes of
arrays per voxel at its peak."""
BYTES_PER_VOXEL = 200
SPACING_RANGE = (0.01, 100.0)  # mm
MAX_SUBJECTS = 9999  # names synth_000 .. synth_9999


@dataclass
class SynthSubject:
    """One phantom: ``image`` (int16 HU) and ``label`` (uint8), arrays ``(z, y, x)``."""

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]  # (x, y, z) mm
    hu: dict[str, float]  # base HU drawn for each structure (before texture, blur, noise)

    def images(self) -> tuple[sitk.Image, sitk.Image]:
        """The image and label map as SimpleITK images centred on the origin."""
        result = []
        for array in (self.image, self.label):
            item = sitk.GetImageFromArray(array)
            item.SetSpacing(self.spacing)
            size = np.array(array.shape[::-1], dtype=float)
            item.SetOrigin(tuple(float(v) for v in -(size - 1) / 2 * np.array(self.spacing)))
            result.append(item)
        return result[0], result[1]


class _Grid:
    """Voxel centres in mm (centred on the volume) and half the field of view per axis."""

    def __init__(self, size: tuple[int, int, int], spacing: tuple[float, float, float]):
        nx, ny, nz = size
        sx, sy, sz = spacing
        self.shape = (nz, ny, nx)
        z = (np.arange(nz) - (nz - 1) / 2) * sz
        y = (np.arange(ny) - (ny - 1) / 2) * sy
        x = (np.arange(nx) - (nx - 1) / 2) * sx
        self.z_mm, self.y_mm, self.x_mm = np.meshgrid(z, y, x, indexing="ij")
        self.half = (nx * sx / 2, ny * sy / 2, nz * sz / 2)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field (Gaussian-filtered white noise)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-12)


def _ellipsoid(rng, xn, yn, zn, centre, axes, angle, wobble=0.08):
    """Inside mask of a rotated ellipsoid (semi-axes ``axes``) with a smoothly deformed surface.

    The surface is ``rho = 1 + d`` with ``d`` a sum of three low-frequency sinusoids of the
    local coordinates (a smooth deformation), so shapes vary smoothly from subject to subject.
    """
    cos, sin = np.cos(angle), np.sin(angle)
    dx, dy, dz = xn - centre[0], yn - centre[1], zn - centre[2]
    u = (cos * dx + sin * dy) / axes[0]
    v = (-sin * dx + cos * dy) / axes[1]
    w = dz / axes[2]
    rho = np.sqrt(u * u + v * v + w * w)
    near = rho < 1.0 + 3 * wobble  # the bumps only matter here (|bump| <= 3 * wobble)
    u, v, w = u[near], v[near], w[near]
    bump = np.zeros_like(u)
    for _ in range(3):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        frequency = rng.uniform(1.5, 3.0)
        phase = rng.uniform(0, 2 * np.pi)
        bump += (
            rng.uniform(0.3, 1.0)
            * wobble
            * np.sin(frequency * (direction[0] * u + direction[1] * v + direction[2] * w) + phase)
        )
    inside = np.zeros(rho.shape, dtype=bool)
    inside[near] = rho[near] < 1.0 + bump
    return inside


def _check_geometry(size, spacing) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """``size`` (voxels) and ``spacing`` (mm), x y z, checked against what drawing needs:
    MTKDError naming the limit otherwise."""
    size, spacing = tuple(size), tuple(spacing)
    if len(size) != 3 or len(spacing) != 3:
        raise MTKDError("synthetic phantoms need three sizes and three spacings (x y z)")
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size):
        raise MTKDError(f"grid size must be three whole numbers of voxels, got {size}")
    size = tuple(int(v) for v in size)
    if any(v < low for v, low in zip(size, MIN_SIZE, strict=True)):
        raise MTKDError(
            f"grid {_text(size)} is too small for the phantoms: the smallest structures need "
            f"at least {_text(MIN_SIZE)} voxels (x y z)"
        )
    voxels = size[0] * size[1] * size[2]
    if voxels > MAX_VOXELS:
        raise MTKDError(
            f"grid {_text(size)} is {voxels:,} voxels; mtkd synth draws at most "
            f"{MAX_VOXELS:,} voxels per phantom (e.g. 512 512 64: about "
            f"{MAX_VOXELS * BYTES_PER_VOXEL / 2**30:.0f} GiB of memory while drawing)"
        )
    try:
        spacing = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        raise MTKDError(f"voxel spacing must be three numbers (mm), got {spacing}") from None
    low, high = SPACING_RANGE
    if not all(low <= v <= high for v in spacing):  # also refuses NaN
        raise MTKDError(f"voxel spacing must be between {low} and {high} mm, got {spacing}")
    return size, spacing  # type: ignore[return-value]


def _text(size: tuple[int, ...]) -> str:
    return "x".join(str(v) for v in size)


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise MTKDError(f"--seed must be a whole number >= 0, got {seed!r}")


def make_subject(
    seed: int,
    index: int,
    size: tuple[int, int, int] = (96, 96, 48),
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0),
) -> SynthSubject:
    """Phantom ``index`` of the cohort drawn with ``seed``; ``size`` and ``spacing`` are x y z."""
    size, spacing = _check_geometry(size, spacing)
    _check_seed(seed)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
    grid = _Grid(size, spacing)
    for _ in range(_ATTEMPTS):  # redraw in the rare case a structure ends up (almost) empty
        subject = _draw(rng, grid, spacing)
        if subject is not None:
            return subject
    raise MTKDError(f"could not draw phantom {index} with every structure on grid {size}")


def _draw(rng: np.random.Generator, grid: _Grid, spacing) -> SynthSubject | None:
    shape = grid.shape
    # body outline: an ellipse filling most of the field of view (varies per subject)
    bx = grid.half[0] * rng.uniform(0.78, 0.92)
    by = grid.half[1] * rng.uniform(0.58, 0.70)
    hz = grid.half[2]
    xn = grid.x_mm / bx
    yn = (grid.y_mm - grid.half[1] * rng.uniform(-0.04, 0.04)) / by
    zn = grid.z_mm / hz
    # the outline tapers a little along z, so slices differ
    taper = 1.0 + rng.uniform(-0.06, 0.06) * zn
    r = np.sqrt((xn / taper) ** 2 + (yn / taper) ** 2)
    fat_t = rng.uniform(0.07, 0.15)
    muscle_t = rng.uniform(0.05, 0.08)
    inner = 1.0 - fat_t - muscle_t
    body = r <= 1.0
    wall = body & (r > inner) & (r <= 1.0 - fat_t)
    cavity = r <= inner

    image = np.full(shape, _AIR, dtype=np.float32)
    image[body] = _FAT + rng.uniform(-10, 10)
    image[wall] = _MUSCLE + rng.uniform(-8, 8)

    # abdominal cavity: mesenteric fat and bowel loops, with gas pockets in the bowel
    bowel = _smooth_field(rng, shape, 2.5) > rng.uniform(-0.3, 0.3)
    image[cavity] = np.where(bowel[cavity], _BOWEL, -90.0)
    gas = np.zeros(shape, dtype=bool)
    for _ in range(int(rng.integers(4, 9))):
        centre = (rng.uniform(-0.4, 0.4), rng.uniform(-0.6, 0.0), rng.uniform(-0.8, 0.8))
        axes = (rng.uniform(0.04, 0.1), rng.uniform(0.05, 0.12), rng.uniform(0.08, 0.2))
        gas |= _ellipsoid(rng, xn, yn, zn, centre, axes, rng.uniform(0, np.pi), 0.15)
    gas &= cavity & bowel
    image[gas] = _AIR + rng.uniform(0, 40)

    # spine: vertebral bodies (cortex brighter) with discs, canal, posterior elements, muscles
    spine_x = rng.uniform(-0.03, 0.03)
    spine_y = inner - rng.uniform(0.30, 0.36)
    vert_a, vert_b = rng.uniform(0.12, 0.15), rng.uniform(0.15, 0.19)
    vert_r = np.sqrt(((xn - spine_x) / vert_a) ** 2 + ((yn - spine_y) / vert_b) ** 2)
    period = rng.uniform(26, 32)
    disc = np.mod(grid.z_mm + rng.uniform(0, period), period) < rng.uniform(5, 8)
    canal_y = spine_y + vert_b + 0.07
    canal_r = np.sqrt(((xn - spine_x) / 0.05) ** 2 + ((yn - canal_y) / 0.06) ** 2)
    arch_r = np.sqrt(((xn - spine_x) / 0.11) ** 2 + ((yn - canal_y - 0.02) / 0.12) ** 2)
    spinous = (np.abs(xn - spine_x) < 0.03) & (yn > canal_y) & (yn < canal_y + 0.22)
    paraspinal = np.zeros(shape, dtype=bool)
    for side in (-1, 1):
        px = spine_x + side * rng.uniform(0.2, 0.24)
        para_r = ((xn - px) / 0.13) ** 2 + ((yn - canal_y - 0.06) / 0.14) ** 2
        paraspinal |= para_r < 1
    image[paraspinal & body] = _MUSCLE + rng.uniform(-5, 5)
    posterior = ((arch_r < 1) | spinous) & ~disc & body
    image[posterior] = rng.uniform(450, 650)
    vertebra = vert_r < 1
    image[vertebra] = np.where(
        disc[vertebra], _DISC, np.where(vert_r[vertebra] > 0.8, 800.0, 300.0)
    )
    image[canal_r < 1] = _CSF
    spine = vertebra | posterior | (canal_r < 1) | paraspinal

    # ribs: thin, slightly sloping bands in the muscle wall, not at the anterior midline
    rib_period = rng.uniform(22, 28)
    rib_z = grid.z_mm + rng.uniform(0, rib_period) + rng.uniform(8, 14) * yn
    ribs = np.mod(rib_z, rib_period) < rng.uniform(6, 9)
    ribs &= (r > inner - 0.01) & (r < 1.0 - fat_t - 0.01) & ((np.abs(xn) > 0.35) | (yn > 0.2))
    image[ribs] = rng.uniform(550, 1000)

    # organ-like structures: later ones never overwrite earlier ones; none in spine or wall
    allowed = cavity & ~spine & (r < inner - 0.02)
    label = np.zeros(shape, dtype=np.uint8)
    texture = _smooth_field(rng, shape, 3.0)
    hu: dict[str, float] = {}
    aorta_hu = rng.uniform(40, 200)
    specs = {
        "liver": ((-0.42, -0.12, 0.25), (0.40, 0.42, 0.60), 60.0),
        "spleen": ((0.50, 0.18, 0.35), (0.15, 0.26, 0.38), 50.0),
        "kidney_left": ((0.35, spine_y + 0.02, -0.10), (0.14, 0.20, 0.42), 35.0),
        "kidney_right": ((-0.35, spine_y + 0.02, -0.25), (0.14, 0.20, 0.42), 35.0),
    }
    for value, name in LABELS.items():
        if name == "aorta":
            ax = spine_x + rng.uniform(0.04, 0.10) + 0.03 * zn
            ay = spine_y - vert_b - rng.uniform(0.08, 0.11)
            radius = rng.uniform(0.07, 0.09)
            inside = ((xn - ax) / radius) ** 2 + ((yn - ay) / (radius * bx / by)) ** 2 < 1
            base = aorta_hu
            amplitude = 4.0
        else:
            (cx, cy, cz), axes, base = specs[name]
            centre = (
                cx + rng.uniform(-0.06, 0.06),
                cy + rng.uniform(-0.06, 0.06),
                cz + rng.uniform(-0.12, 0.12),
            )
            axes = tuple(a * rng.uniform(0.8, 1.2) for a in axes)
            angle = rng.uniform(-0.35, 0.35) + (0.5 if name == "spleen" else 0.0)
            inside = _ellipsoid(rng, xn, yn, zn, centre, axes, angle)
            base = base + rng.uniform(-5, 5)
            amplitude = 4.0
        mask = inside & allowed & (label == 0)
        if ndimage.binary_erosion(mask).sum() < _MIN_VOXELS:
            return None
        label[mask] = value
        values = base + amplitude * texture[mask]
        if name.startswith("kidney"):  # brighter cortex (an outer layer) around the medulla
            depth = ndimage.distance_transform_edt(mask, sampling=spacing[::-1])[mask]
            values += np.where(depth <= _CORTEX_MM, 10.0, -5.0)
        image[mask] = values
        hu[name] = float(base)

    # partial-volume blur and noise, then CT-like int16 HU
    image = ndimage.gaussian_filter(image, BLUR_VOXELS, mode="nearest")
    image += rng.normal(0.0, NOISE_HU, shape).astype(np.float32)
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    return SynthSubject(image, label, spacing, hu)


def _is_cohort(folder: Path) -> bool:
    try:
        data = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and MARKER in data


def write_cohort(
    output: str | Path,
    subjects: int = 20,
    seed: int = 0,
    size: tuple[int, int, int] = (96, 96, 48),
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0),
) -> Path:
    """Write ``subjects`` phantoms as an MSD cohort in ``output``; returns its dataset.json.

    ``output`` must be missing, empty or an earlier synthetic cohort (which is replaced);
    anything else raises MTKDError so no real data is mixed with or overwritten by phantoms.
    """
    output = Path(output)
    if subjects < 1:
        raise MTKDError(f"--subjects must be at least 1, got {subjects}")
    if subjects > MAX_SUBJECTS:
        raise MTKDError(f"--subjects must be at most {MAX_SUBJECTS}, got {subjects}")
    _check_seed(seed)
    size, spacing = _check_geometry(size, spacing)
    if output.exists() and not output.is_dir():
        raise MTKDError("output exists and is not a folder", output)
    above = next(folder for folder in output.absolute().parents if folder.exists())
    if not above.is_dir():
        raise MTKDError(f"cannot make the output folder: {above} is a file", output)
    if output.is_dir() and any(output.iterdir()) and not _is_cohort(output):
        raise MTKDError(
            "output folder is not empty and is not a synthetic cohort; choose another folder",
            output,
        )
    names = [f"{PREFIX}{i:03d}" for i in range(subjects)]
    hu: dict[str, dict[str, float]] = {}
    for index, name in enumerate(names):
        subject = make_subject(seed, index, size, spacing)
        image, label = subject.images()
        write_image(image, output / "imagesTr" / f"{name}.nii.gz")
        write_image(label, output / "labelsTr" / f"{name}.nii.gz")
        hu[name] = {key: round(value, 2) for key, value in subject.hu.items()}
    for folder in ("imagesTr", "labelsTr"):  # files of an earlier, larger synthetic cohort
        for stale in (output / folder).glob(f"{PREFIX}*.nii.gz"):
            if stale.name[: -len(".nii.gz")] not in names:
                stale.unlink()
    dataset = {
        "name": COHORT_NAME,
        "description": (
            "SYNTHETIC abdominal CT phantoms generated by `mtkd synth` (mtkd.data.synth): "
            "deformed-ellipsoid organs with typical Hounsfield units, blur and noise. "
            "Not patient data; for testing and demonstrations only."
        ),
        "modality": {"0": "CT"},
        "labels": {"0": "background", **{str(k): v for k, v in LABELS.items()}},
        "numTraining": subjects,
        "numTest": 0,
        "training": [
            {
                "image": f"./imagesTr/{name}.nii.gz",
                "label": f"./labelsTr/{name}.nii.gz",
                "patient": name,
            }
            for name in names
        ],
        "test": [],
        MARKER: {
            "seed": int(seed),
            "size": list(size),
            "spacing": list(spacing),
            "noise_hu": NOISE_HU,
            "blur_voxels": BLUR_VOXELS,
            "base_hu": hu,
        },
    }
    path = output / "dataset.json"
    atomic_write_bytes(path, (json.dumps(dataset, indent=2) + "\n").encode("utf-8"))
    return path
