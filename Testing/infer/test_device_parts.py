"""Connected parts, holes and post-processing with torch ops (the GPU path of
``mtkd.infer.postprocess``), run here on the CPU and compared with SciPy's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from mtkd.infer.device_parts import connected_parts, enclosed_holes, part_sizes
from mtkd.infer.postprocess import DEVICE_BYTES_PER_VOXEL, PostProcessing, StructureRule

FACES = ndimage.generate_binary_structure(3, 1)
CORNERS = ndimage.generate_binary_structure(3, 3)


def same_partition(ids: np.ndarray, reference: np.ndarray) -> bool:
    """Whether two part maps (0 = outside) split the voxels into the same parts."""
    if not np.array_equal(ids > 0, reference > 0):
        return False
    inside = reference > 0
    pairs = np.unique(np.stack([ids[inside], reference[inside]]), axis=1)
    # a bijection between the ids: every id pairs with exactly one reference id and back
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def random_mask(seed: int, fill: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(5, 30, 3))
    smooth = ndimage.gaussian_filter(rng.standard_normal(shape), 1.2)
    return smooth > np.quantile(smooth, 1 - fill)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("connectivity, structure", [(26, CORNERS), (6, FACES)])
def test_parts_are_scipys_parts(seed, connectivity, structure):
    mask = random_mask(seed, fill=0.15 + 0.1 * seed)
    ids = connected_parts(torch.from_numpy(mask), connectivity).numpy()
    reference, count = ndimage.label(mask, structure=structure)
    assert same_partition(ids, reference)
    sizes = part_sizes(torch.from_numpy(ids))[1].numpy()
    assert sorted(sizes) == sorted(np.bincount(reference.ravel())[1:])
    assert len(sizes) == count


def test_a_long_winding_part_is_one_part():
    """A serpentine one voxel wide, 430 voxels long (many rounds of growing), is one part; a
    diagonal line is one part through corners and one part per voxel through faces."""
    mask = np.zeros((40, 21, 3), bool)
    for row in range(0, 21, 2):
        mask[:, row, 1] = True
        end = 39 if (row // 2) % 2 == 0 else 0
        if row + 2 < 21:
            mask[end, row + 1, 1] = True
    assert ndimage.label(mask, FACES)[1] == 1
    for connectivity in (6, 26):
        ids = connected_parts(torch.from_numpy(mask), connectivity).numpy()
        assert len(np.unique(ids[mask])) == 1 and not ids[~mask].any()
    diagonal = np.zeros((6, 6, 6), bool)
    diagonal[range(6), range(6), range(6)] = True  # touching through corners only
    assert len(np.unique(connected_parts(torch.from_numpy(diagonal), 26).numpy()[diagonal])) == 1
    assert len(np.unique(connected_parts(torch.from_numpy(diagonal), 6).numpy()[diagonal])) == 6


def test_holes_are_the_enclosed_outside():
    for seed in range(4):
        mask = random_mask(seed, fill=0.6)
        holes = enclosed_holes(torch.from_numpy(mask)).numpy()
        assert np.array_equal(holes, ndimage.binary_fill_holes(mask) & ~mask)
    shell = np.ones((5, 5, 5), bool)
    shell[1:4, 1:4, 1:4] = False
    assert enclosed_holes(torch.from_numpy(shell)).numpy().sum() == 27


def test_bad_masks_are_refused():
    with pytest.raises(ValueError, match="bool"):
        connected_parts(torch.zeros((3, 3, 3), dtype=torch.uint8))
    with pytest.raises(ValueError, match="connectivity"):
        connected_parts(torch.zeros((3, 3, 3), dtype=torch.bool), connectivity=18)


def blobs_with_islands(seed: int) -> np.ndarray:
    """Three structures, each one large blob (a unique largest part) and islands of random
    sizes, some touching other structures, on an odd-sized map."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(24, 40, 3))
    labels = np.zeros(shape, np.uint8)
    blobs = [[int(rng.integers(0, n - 9)) for n in shape] for _ in (1, 2, 3)]
    for _ in range(int(rng.integers(10, 40))):
        corner = [int(rng.integers(0, n - 1)) for n in shape]
        extent = [int(rng.integers(1, 4)) for _ in shape]
        labels[tuple(slice(c, c + e) for c, e in zip(corner, extent))] = rng.integers(0, 4)
    for value, corner in enumerate(blobs, start=1):  # each with a hole, for fill_holes
        labels[tuple(slice(c, c + 8) for c in corner)] = value
        labels[tuple(c + 4 for c in corner)] = 0
    return labels


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    "rule",
    [
        StructureRule(largest_only=True),
        StructureRule(min_volume_ml=0.01),
        StructureRule(largest_only=True, fill_holes=True),
        StructureRule(fill_holes=True),
    ],
    ids=["largest", "min_volume", "largest_fill", "fill"],
)
def test_a_torch_label_map_is_cleaned_as_the_numpy_one(seed, rule):
    labels = blobs_with_islands(seed)
    sizes = [np.bincount(ndimage.label(labels == v, CORNERS)[0].ravel())[1:] for v in (1, 2, 3)]
    assert all(np.sum(s == s.max()) == 1 for s in sizes)  # no tie for the largest part
    postprocessing = PostProcessing({v: rule for v in (1, 2, 3)})
    expected = postprocessing.apply(labels, (1.0, 1.0, 1.0))
    tensor = torch.from_numpy(labels.copy())
    cleaned = postprocessing.apply(tensor, (1.0, 1.0, 1.0))
    assert isinstance(cleaned, torch.Tensor) and cleaned.dtype == torch.uint8
    assert np.array_equal(cleaned.numpy(), expected)
    assert np.array_equal(tensor.numpy(), labels)  # the input is not changed
    assert not np.array_equal(expected, labels)  # the rule did something to compare


def budget_never_asked() -> int:
    raise AssertionError("a NumPy map is cleaned on the host: no device budget to ask for")


def test_the_map_is_cleaned_on_the_host_where_the_device_budget_is_short():
    labels = blobs_with_islands(0)
    postprocessing = PostProcessing({v: StructureRule(largest_only=True) for v in (1, 2, 3)})
    expected = postprocessing.apply(labels, (1.0, 1.0, 1.0))
    tensor = torch.from_numpy(labels.copy())
    fits = DEVICE_BYTES_PER_VOXEL * tensor.numel()
    on_device = postprocessing.apply_within(tensor, (1.0, 1.0, 1.0), budget_bytes=lambda: fits)
    assert isinstance(on_device, torch.Tensor)
    on_host = postprocessing.apply_within(tensor, (1.0, 1.0, 1.0), budget_bytes=lambda: fits - 1)
    assert isinstance(on_host, np.ndarray)
    np.testing.assert_array_equal(on_device.numpy(), expected)
    np.testing.assert_array_equal(on_host, expected)
    np.testing.assert_array_equal(
        postprocessing.apply_within(labels, (1, 1, 1), budget_never_asked), expected
    )
