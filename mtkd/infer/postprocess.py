"""Clean a label map the way clinicians expect: per structure, keep its largest connected part
or the parts above a volume, and fill its enclosed holes.

A small student leaves islands far from the organs (they dominate its HD95); one liver is one
connected piece. The rules run on the label map once it is on the input image's grid, each
structure inside its own bounding box, so their cost follows the structures' size rather than
the volume's. Parts are connected through faces, edges and corners (26-connectivity in 3-D).
A voxel a rule removes becomes background; a filled hole takes only background voxels, never
another structure's. A NumPy label map is cleaned with SciPy on the host; a torch label map on
its own device (:mod:`mtkd.infer.device_parts`), so that a GPU's output never makes the round
trip to the host for it. Both give the same map, except which of two largest parts of exactly
the same size is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from scipy import ndimage

from mtkd.data.labels import LabelTable
from mtkd.errors import MTKDError
from mtkd.infer.device_parts import connected_parts, enclosed_holes, part_sizes
from mtkd.infer.fallback import is_out_of_memory
from mtkd.infer.transfers import to_host

LabelArray = TypeVar("LabelArray", np.ndarray, torch.Tensor)
# working memory of the torch path per voxel of the label map, a bound: the cleaned copy and
# masks (3 bytes); int32 parents, their spread, the neighbourhood max's two copies and the
# hooked parents (20); int64 indices of the voxels inside and of their parents (16)
DEVICE_BYTES_PER_VOXEL = 48

__all__ = ["PostProcessing", "StructureRule", "postprocessing_for", "stored_postprocessing"]


@dataclass(frozen=True)
class StructureRule:
    """What to do with one structure: keep only its largest part (``largest_only``), drop
    parts below ``min_volume_ml`` millilitres, fill its enclosed holes (``fill_holes``)."""

    largest_only: bool = False
    min_volume_ml: float = 0.0
    fill_holes: bool = False

    def __post_init__(self) -> None:
        if not self.min_volume_ml >= 0:
            raise MTKDError(f"a minimum part volume must be 0 or more ml, got {self.min_volume_ml}")

    @property
    def changes_parts(self) -> bool:
        return self.largest_only or self.min_volume_ml > 0


@dataclass(frozen=True)
class PostProcessing:
    """Rules by label value; a label map's other structures are left as they are."""

    rules: dict[int, StructureRule] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return any(rule.changes_parts or rule.fill_holes for rule in self.rules.values())

    def apply(self, labels: LabelArray, spacing: Sequence[float]) -> LabelArray:
        """The cleaned copy of ``labels`` (any 3-D integer array, values 0..K; a NumPy array,
        or a torch tensor cleaned on its device) whose voxels measure ``spacing`` (mm, in the
        array's axis order)."""
        if labels.ndim != 3 or len(spacing) != 3:
            raise MTKDError(f"post-processing needs a 3-D label map, got {tuple(labels.shape)}")
        voxel_ml = float(np.prod(spacing)) / 1000.0
        if isinstance(labels, torch.Tensor):
            return self._apply_to_tensor(labels, voxel_ml)
        cleaned = labels.copy()
        if not self or not cleaned.any():
            return cleaned
        boxes = ndimage.find_objects(cleaned)
        for value, rule in self.rules.items():
            if value < 1 or value > len(boxes) or boxes[value - 1] is None:
                continue  # not in this map
            region = cleaned[boxes[value - 1]]  # a view: edits go to ``cleaned``
            if rule.changes_parts:
                _remove_parts(region, value, rule, voxel_ml)
            if rule.fill_holes:
                tight = ndimage.find_objects((region == value).view(np.uint8))
                if tight and tight[0] is not None:  # the box of what is left
                    kept = region[tight[0]]
                    kept[_holes(kept == value) & (kept == 0)] = value
        return cleaned

    def apply_within(
        self,
        labels: np.ndarray | torch.Tensor,
        spacing: Sequence[float],
        budget_bytes: Callable[[], int],
    ) -> np.ndarray | torch.Tensor:
        """:meth:`apply` where it fits: a tensor on its device when the torch path's working
        memory (:data:`DEVICE_BYTES_PER_VOXEL` per voxel of the map, a bound) fits
        ``budget_bytes()`` (asked only for a tensor), else, or when the device runs out of
        memory all the same, on the host (a NumPy map, cleaned with SciPy)."""
        if isinstance(labels, torch.Tensor):
            if DEVICE_BYTES_PER_VOXEL * labels.numel() <= budget_bytes():
                try:
                    return self.apply(labels, spacing)
                except Exception as caught:  # noqa: BLE001 - only out-of-memory falls back
                    if not is_out_of_memory(caught):
                        raise
                    if labels.device.type == "cuda":
                        torch.cuda.empty_cache()
            labels = to_host(labels)
        return self.apply(labels, spacing)

    def _apply_to_tensor(self, labels: torch.Tensor, voxel_ml: float) -> torch.Tensor:
        """:meth:`apply` on a torch label map, with torch ops on its device."""
        cleaned = labels.clone()
        if not self:
            return cleaned
        for value, rule in self.rules.items():
            box = _tensor_box(cleaned == value)
            if box is None:
                continue  # not in this map
            region = cleaned[box]  # a view: edits go to ``cleaned``
            if rule.changes_parts:
                mask = region == value
                parts = connected_parts(mask)
                ids, sizes = part_sizes(parts)
                big_enough = sizes * voxel_ml >= rule.min_volume_ml
                kept = ids[big_enough]
                if rule.largest_only and kept.numel():
                    kept = kept[sizes[big_enough].argmax()].reshape(1)
                region[mask & ~torch.isin(parts, kept)] = 0
            if rule.fill_holes:
                tight = _tensor_box(region == value)  # the box of what is left
                if tight is not None:
                    inner = region[tight]
                    inner[enclosed_holes(inner == value) & (inner == 0)] = value
        return cleaned

    def describe(self, labels: LabelTable) -> str:
        """The rules in words, by structure name ("" when there is nothing to do)."""
        parts = []
        for what, wanted in (
            ("largest part of", lambda rule: rule.largest_only),
            ("holes filled in", lambda rule: rule.fill_holes),
        ):
            names = [labels[value] for value, rule in self.rules.items() if wanted(rule)]
            if names:
                parts.append(f"{what} {', '.join(names)}")
        volumes = {rule.min_volume_ml for rule in self.rules.values() if rule.min_volume_ml}
        if volumes:
            parts.append(f"parts below {', '.join(f'{v:g}' for v in sorted(volumes))} ml removed")
        return "; ".join(parts)


def _tensor_box(mask: torch.Tensor) -> tuple[slice, slice, slice] | None:
    """The bounding box (slices) of a 3-D bool tensor's set voxels; None when there are none."""
    box = []
    for dim in range(3):
        others = tuple(d for d in range(3) if d != dim)
        where = torch.nonzero(mask.any(dim=others)).flatten()
        if where.numel() == 0:
            return None
        box.append(slice(int(where[0]), int(where[-1]) + 1))
    return tuple(box)


_CONNECTIVITY = ndimage.generate_binary_structure(3, 3)
_COARSE = 4  # the coarse grid of _connected_parts: two halvings


def _remove_parts(region: np.ndarray, value: int, rule: StructureRule, voxel_ml: float) -> None:
    """Set to 0, in place, the parts of structure ``value`` in ``region`` that the rule drops:
    those below ``min_volume_ml`` and, with ``largest_only``, all but the largest."""
    parts = list(_connected_parts(region == value))
    sizes = [int(voxels.sum()) for _, voxels in parts]
    keep = [size * voxel_ml >= rule.min_volume_ml for size in sizes]
    if rule.largest_only:
        candidates = [index for index, kept in enumerate(keep) if kept]
        best = max(candidates, key=sizes.__getitem__) if candidates else None
        keep = [index == best for index in range(len(parts))]
    for (box, voxels), kept in zip(parts, keep):
        if not kept:
            region[box][voxels] = 0


def _connected_parts(mask: np.ndarray):
    """Each connected part of ``mask`` as (box, voxels): its bounding box (slices of
    ``mask``) and its voxels within that box (bool). The parts are found on a grid four times
    as coarse first (two touching voxels fall in the same or touching coarse cells, so a part
    never spans two coarse parts), then exactly within each coarse part's box: the cost
    follows the parts' boxes, not the box of a structure with islands far apart."""
    coarse_parts, _ = ndimage.label(_coarsened(_coarsened(mask)), structure=_CONNECTIVITY)
    for index, coarse_box in enumerate(ndimage.find_objects(coarse_parts), start=1):
        box = tuple(
            slice(_COARSE * cells.start, min(_COARSE * cells.stop, size))
            for cells, size in zip(coarse_box, mask.shape)
        )
        owned = coarse_parts[coarse_box] == index
        for axis in range(3):
            owned = np.repeat(owned, _COARSE, axis=axis)
        owned = owned[tuple(slice(0, b.stop - b.start) for b in box)]
        fine, _ = ndimage.label(mask[box] & owned, structure=_CONNECTIVITY)
        for part, fine_box in enumerate(ndimage.find_objects(fine), start=1):
            voxels = fine[fine_box] == part
            yield (
                tuple(slice(b.start + f.start, b.start + f.stop) for b, f in zip(box, fine_box)),
                voxels,
            )


def _coarsened(mask: np.ndarray) -> np.ndarray:
    """``mask`` on a grid twice as coarse: a cell is set where any of its 2x2x2 voxels is."""
    coarse = np.zeros([(size + 1) // 2 for size in mask.shape], bool)
    for offsets in np.ndindex(2, 2, 2):
        voxels = mask[tuple(slice(offset, None, 2) for offset in offsets)]
        coarse[tuple(slice(0, size) for size in voxels.shape)] |= voxels
    return coarse


def _holes(mask: np.ndarray) -> np.ndarray:
    """The background voxels ``mask`` encloses: the parts of its background (connected
    through faces) that do not reach the array's border."""
    background, count = ndimage.label(~mask)
    if count == 0:
        return np.zeros_like(mask)
    reaches_border = np.zeros(count + 1, bool)
    for axis in range(mask.ndim):
        for end in (0, -1):
            reaches_border[np.unique(np.take(background, end, axis=axis))] = True
    reaches_border[0] = True  # label 0: the mask itself
    return ~reaches_border[background]


def postprocessing_for(
    labels: LabelTable,
    *,
    largest_only: Iterable[str] | None = None,
    min_volume_ml: float = 0.0,
    fill_holes: bool = False,
) -> PostProcessing:
    """Rules for a model's structures from the options of ``mtkd segment``/``evaluate``:
    ``largest_only`` names the structures that keep only their largest part (empty: all;
    None: none); ``min_volume_ml`` and ``fill_holes`` apply to every structure. An unknown
    name is an MTKDError listing the model's structures."""
    names = list(labels.names)
    chosen = set(names) if largest_only is not None and not list(largest_only) else set()
    for name in largest_only or []:
        if name not in names:
            raise MTKDError(
                f"no structure named {name!r} to keep the largest part of; the model's "
                f"structures: {', '.join(names)}"
            )
        chosen.add(name)
    rules = {
        value: StructureRule(
            largest_only=name in chosen, min_volume_ml=min_volume_ml, fill_holes=fill_holes
        )
        for value, name in zip(labels.label_values, names)
    }
    return PostProcessing(rules)


def stored_postprocessing(
    metadata: dict, labels: LabelTable, where: str | Path | None = None
) -> PostProcessing:
    """The post-processing a model chose on its validation cases (its metadata's
    ``postprocessing``, :func:`mtkd.engine.validation.largest_part_choice`); none for a model
    without one. MTKDError naming ``where`` for a choice that names no structure of the
    model."""
    stored = metadata.get("postprocessing") or {}
    names = stored.get("largest_only", [])
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise MTKDError(
            "invalid model metadata: postprocessing.largest_only must be a list of structure names",
            where,
        )
    unknown = [name for name in names if name not in labels.names]
    if unknown:
        raise MTKDError(
            f"invalid model metadata: postprocessing.largest_only names {', '.join(unknown)}, "
            f"not a structure of the model ({', '.join(labels.names)})",
            where,
        )
    return postprocessing_for(labels, largest_only=names) if names else PostProcessing()
