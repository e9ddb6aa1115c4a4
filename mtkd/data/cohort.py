"""A synthetic cohort written in the MSD layout (``mtkd synth``), in either phantom style:
``ellipsoid`` (:mod:`mtkd.data.synth`) or ``ct`` (:mod:`mtkd.data.synth_ct`).

SYNTHETIC volumes, not patient data: ``dataset.json`` says so in its name and description, and
its ``mtkd_synth`` entry records the seed, grid, style and each subject's drawn parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

from mtkd.data import synth_ct
from mtkd.data.atomic import atomic_write_bytes
from mtkd.data.image_io import write_image
from mtkd.data.synth import (
    BLUR_VOXELS,
    DESCRIPTION,
    LABELS,
    NOISE_HU,
    check_geometry,
    check_seed,
    make_subject,
)
from mtkd.errors import MTKDError

__all__ = ["COHORT_NAME", "STYLES", "write_cohort"]

COHORT_NAME = "MTKD synthetic abdominal phantoms (SYNTHETIC, not patient data)"
MARKER = "mtkd_synth"
"""Key in dataset.json that marks a folder written by :func:`write_cohort`."""
PREFIX = "synth_"
MAX_SUBJECTS = 9999  # names synth_000 .. synth_9999
STYLES = ("ellipsoid", "ct")
"""Phantom styles of :func:`write_cohort`: ``ellipsoid`` (:mod:`mtkd.data.synth`, the
default) and ``ct`` (:mod:`mtkd.data.synth_ct`: deformed organs touching unlabelled neighbours,
contrast phases, lesions, vessels, per-subject scanner settings)."""


def _style(style: str, difficulty: float | None):
    """``(draw(seed, index, size, spacing), description, marker entries)`` of a style."""
    if style == "ellipsoid":
        if difficulty is not None:
            raise MTKDError("--difficulty applies to --style ct only")
        return make_subject, DESCRIPTION, {"noise_hu": NOISE_HU, "blur_voxels": BLUR_VOXELS}
    if style == "ct":
        level = synth_ct.check_difficulty(synth_ct.DIFFICULTY if difficulty is None else difficulty)

        def draw(seed, index, size, spacing):
            return synth_ct.make_ct_subject(seed, index, size, spacing, difficulty=level)

        return draw, synth_ct.DESCRIPTION, {"style": "ct", "difficulty": level}
    raise MTKDError(f"unknown phantom style {style!r}; choose one of {', '.join(STYLES)}")


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
    style: str = "ellipsoid",
    difficulty: float | None = None,
) -> Path:
    """Write ``subjects`` phantoms as an MSD cohort in ``output``; returns its dataset.json.

    ``style`` is one of :data:`STYLES`; ``difficulty`` (0..1, ``ct`` only; default 0.5) sets
    border contrast, noise and lesions there. ``output`` must be missing, empty or an earlier
    synthetic cohort (which is replaced); anything else raises MTKDError so no real data is
    mixed with or overwritten by phantoms.
    """
    output = Path(output)
    draw, description, marker = _style(style, difficulty)
    if subjects < 1:
        raise MTKDError(f"--subjects must be at least 1, got {subjects}")
    if subjects > MAX_SUBJECTS:
        raise MTKDError(f"--subjects must be at most {MAX_SUBJECTS}, got {subjects}")
    check_seed(seed)
    size, spacing = check_geometry(size, spacing)
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
        subject = draw(seed, index, size, spacing)
        image, label = subject.images()
        write_image(image, output / "imagesTr" / f"{name}.nii.gz")
        write_image(label, output / "labelsTr" / f"{name}.nii.gz")
        hu[name] = {key: round(value, 2) for key, value in subject.hu.items()}
        if subject.info is not None:
            marker.setdefault("subjects", {})[name] = subject.info
    for folder in ("imagesTr", "labelsTr"):  # files of an earlier, larger synthetic cohort
        for stale in (output / folder).glob(f"{PREFIX}*.nii.gz"):
            if stale.name[: -len(".nii.gz")] not in names:
                stale.unlink()
    dataset = {
        "name": COHORT_NAME,
        "description": description,
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
            **marker,
            "base_hu": hu,
        },
    }
    path = output / "dataset.json"
    atomic_write_bytes(path, (json.dumps(dataset, indent=2) + "\n").encode("utf-8"))
    return path
