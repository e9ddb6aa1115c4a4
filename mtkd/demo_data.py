"""The demo's dataset: one bundled CT cut into slabs of consecutive axial slices, one case each.

A slab is in exactly one of train, validation or test, so no test slice is ever seen in
training. :func:`write_whole_ct_slabs` (the demo's) covers the CT's whole axial extent: slabs
without any of the structures are negatives, so the models learn where there is no organ and
their segmentation of the whole CT stays plausible outside the organs' slices.
:func:`write_slab_dataset` keeps only the 45 slices below the structures' top (small and fast,
for the test fixtures).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from mtkd.data.image_io import read_image, read_label, write_image
from mtkd.data.labels import LabelTable
from mtkd.errors import MTKDError

STRUCTURES = ["liver", "spleen", "kidney_right", "kidney_left", "stomach"]
SLAB = 3  # slices per slab case
# counted from the top slab down, separately for slabs with and without structures
PERIOD = 5
TEST_POSITION = 2  # slabs 2, 7, 12, ... of each kind are test
VAL_POSITION = 4  # slabs 4, 9, 14, ... of each kind are validation
# write_slab_dataset: 15 slabs below the structures' top, split by index from the bottom
STRUCTURE_SLABS = 15
FIXTURE_TEST, FIXTURE_VAL = (2, 7, 12), (5, 10)


def slab_bounds(depth: int, top: int | None = None, count: int | None = None) -> list[range]:
    """Axial slice ranges of ``SLAB`` slices, bottom to top, laid from ``top`` (default: the
    CT's top, ``depth``) down; ``count`` slabs, or down to slice 0, where the lowest slab also
    takes the one or two slices left over."""
    top = depth if top is None else top
    if count is not None:
        return [range(top - (n + 1) * SLAB, top - n * SLAB) for n in reversed(range(count))]
    if top < SLAB:
        raise MTKDError(f"the CT has {top} axial slices; the demo needs at least {SLAB}")
    bounds = [range(top - (n + 1) * SLAB, top - n * SLAB) for n in reversed(range(top // SLAB))]
    bounds[0] = range(0, bounds[0].stop)
    return bounds


def split_slabs(case_ids: Sequence[str], has_structure: Sequence[bool]) -> dict[str, list[str]]:
    """Fixed split of slab cases (bottom to top) by position, the same for slabs with and
    without structures: counted from the top, slab ``PERIOD * n + TEST_POSITION`` of each kind
    is test, ``PERIOD * n + VAL_POSITION`` validation, the rest training; ``student_train`` is
    every other training slab of each kind, so the students keep the teacher's mix of slabs
    with and without organs. Each list is ordered bottom to top."""
    split: dict[str, list[str]] = {"train": [], "val": [], "test": [], "student_train": []}
    for kind in (True, False):
        ids = [c for c, has in zip(case_ids, has_structure, strict=True) if has == kind]
        from_top = list(reversed(ids))
        train = []
        for position, case_id in enumerate(from_top):
            if position % PERIOD == TEST_POSITION:
                split["test"].append(case_id)
            elif position % PERIOD == VAL_POSITION:
                split["val"].append(case_id)
            else:
                train.append(case_id)
        split["train"] += train
        split["student_train"] += train[::2]
    order = {case_id: index for index, case_id in enumerate(case_ids)}
    return {part: sorted(ids, key=order.__getitem__) for part, ids in split.items()}


def _structure_slices(
    label: sitk.Image, seg: Path, names: Path, structures: Sequence[str]
) -> np.ndarray:
    """Per axial slice (bottom to top): whether it holds any of ``structures``."""
    table = LabelTable.from_json(names)
    wanted = [value for value, name in table.items() if name in structures]
    array = sitk.GetArrayViewFromImage(label)  # (z, y, x)
    present = np.isin(array, wanted).any(axis=(1, 2))
    if not present.any():
        raise MTKDError(f"none of {', '.join(structures)} is in the label map", path=seg)
    return present


def _write_slabs(
    image: sitk.Image, label: sitk.Image, bounds: list[range], folder: Path
) -> list[str]:
    """Write each slab as ``images/slabNN.nii.gz`` + ``labels/slabNN.nii.gz``; its ids."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    width, height = image.GetSize()[:2]
    case_ids = []
    for index, slices in enumerate(bounds):
        case_id = f"slab{index:02d}"
        size, start = [width, height, len(slices)], [0, 0, slices.start]
        write_image(
            sitk.RegionOfInterest(image, size, start), folder / "images" / f"{case_id}.nii.gz"
        )
        write_image(
            sitk.RegionOfInterest(label, size, start), folder / "labels" / f"{case_id}.nii.gz"
        )
        case_ids.append(case_id)
    return case_ids


def write_whole_ct_slabs(
    ct: Path, seg: Path, names: Path, folder: Path, structures: Sequence[str]
) -> tuple[list[str], dict, list[range]]:
    """Cut the whole CT into slab cases (folder-pairs layout) and split them.

    Returns the case ids (bottom to top), the split {"train", "val", "test", "student_train"}
    (slabs with and without ``structures`` in each part) and each slab's slice range.
    """
    image = read_image(ct)
    label = read_label(seg, reference=image)
    present = _structure_slices(label, seg, names, structures)
    bounds = slab_bounds(image.GetSize()[2])
    has_structure = [bool(present[slices.start : slices.stop].any()) for slices in bounds]
    case_ids = _write_slabs(image, label, bounds, folder)
    return case_ids, split_slabs(case_ids, has_structure), bounds


def write_slab_dataset(
    ct: Path, seg: Path, names: Path, folder: Path, structures: Sequence[str] = STRUCTURES
) -> tuple[list[str], dict]:
    """Cut the ``STRUCTURE_SLABS`` slabs below the structures' top into cases (no negatives).

    Returns the case ids and the fixed split {"train", "val", "test"} (test slabs 2, 7, 12 and
    validation slabs 5, 10, counted from the bottom).
    """
    image = read_image(ct)
    label = read_label(seg, reference=image)
    present = _structure_slices(label, seg, names, structures)
    top = int(np.flatnonzero(present).max()) + 1
    if top < STRUCTURE_SLABS * SLAB:
        raise MTKDError(
            f"the structures' top is slice {top}; {STRUCTURE_SLABS} slabs need "
            f"{STRUCTURE_SLABS * SLAB} slices below it",
            path=seg,
        )
    case_ids = _write_slabs(image, label, slab_bounds(top, top, STRUCTURE_SLABS), folder)
    test = [case_ids[i] for i in FIXTURE_TEST]
    val = [case_ids[i] for i in FIXTURE_VAL]
    train = [c for c in case_ids if c not in test + val]
    return case_ids, {"train": train, "val": val, "test": test}
