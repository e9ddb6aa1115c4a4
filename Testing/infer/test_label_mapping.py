"""Labels of resampled probabilities from the source labels where exact
(:mod:`mtkd.infer.label_mapping`) against the argmax of the fully resampled probabilities."""

from __future__ import annotations

import pytest
import torch

from mtkd.infer import label_mapping
from mtkd.infer.label_mapping import resampled_labels
from mtkd.infer.separable import resample_separable


def smooth_logits(channels: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Blobs: random logits on a coarse grid, upsampled, so that labels form regions."""
    generator = torch.Generator().manual_seed(seed)
    coarse = 4 * torch.randn((1, channels, *(max(s // 6, 2) for s in shape)), generator=generator)
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear")[0]


def coordinates(source: int, target: int, shift: float = 0.0) -> torch.Tensor:
    """Where ``target`` voxels sample a ``source``-voxel axis (float64, clamped)."""
    scale = source / target
    return ((torch.arange(target, dtype=torch.float64) + 0.5) * scale - 0.5 + shift).clamp(
        0, source - 1
    )


CASES = {
    # (source shape, target shape, per axis resampled?)
    "upsampled": ((20, 18, 16), (41, 37, 30), (True, True, True)),
    "twice as fine (weights 0 and 0.5)": ((12, 12, 10), (24, 24, 20), (True, True, True)),
    "in-plane only": ((16, 14, 9), (33, 29, 9), (True, True, False)),
    "one source slice": ((16, 14, 1), (30, 25, 5), (True, True, True)),
    "downsampled": ((30, 28, 20), (17, 15, 11), (True, True, True)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("field", ["smooth", "random"])
@pytest.mark.parametrize("dense_above", [1.0, label_mapping.DENSE_ABOVE])
@pytest.mark.parametrize("layout", ["channels first", "z first"])
def test_labels_equal_the_argmax_of_the_resampled_probabilities(
    case, activation, field, dense_above, layout, monkeypatch
):
    """Border voxels interpolated one by one (``dense_above`` 1: never all of them) or, for
    the speckled random field, by the dense pass; for probabilities laid out in memory as a
    3-D network gives them (C, X, Y, Z) and as slices of a 2-D one (Z, C, Y, X)."""
    monkeypatch.setattr(label_mapping, "DENSE_ABOVE", dense_above)
    source, target, resampled = CASES[case]
    channels = 1 if activation == "sigmoid" else 4
    if field == "smooth":
        logits = smooth_logits(channels, source, seed=3)
    else:  # voxel-wise independent: borders everywhere, the hardest case
        logits = 3 * torch.randn((channels, *source), generator=torch.Generator().manual_seed(5))
    probabilities = logits.sigmoid() if activation == "sigmoid" else logits.softmax(0)
    if layout == "z first":
        probabilities = probabilities.permute(3, 0, 2, 1).contiguous().permute(1, 3, 2, 0)
    coords = [
        coordinates(s, t, shift=0.1 * j) if r else None
        for j, (s, t, r) in enumerate(zip(source, target, resampled, strict=True))
    ]
    same = [c is None for c in coords]
    order = [j for j in (2, 0, 1) if not same[j]]
    dense = resample_separable(probabilities, coords, same, order)
    expected = (dense[0] > 0.5).to(torch.uint8) if activation == "sigmoid" else dense.argmax(0)
    labels = resampled_labels(probabilities, coords, order, activation)
    assert tuple(labels.shape) == tuple(dense.shape[1:])
    differ = labels.long() != expected.long()
    if differ.any():  # only float-rounding ties may differ
        if activation == "sigmoid":
            margin = (dense[0] - 0.5).abs()
        else:
            top = dense.topk(2, dim=0).values
            margin = top[0] - top[1]
        assert float(margin[differ].max()) < 1e-5
    assert float(differ.float().mean()) < 1e-3
    assert len(torch.unique(expected)) > 1  # a meaningful comparison: several labels


def test_a_volume_of_one_label_needs_no_interpolation():
    probabilities = torch.zeros((3, 8, 8, 8))
    probabilities[2] = 1.0
    coords = [coordinates(8, 20), coordinates(8, 17), None]
    labels = resampled_labels(probabilities, coords, [0, 1], "softmax")
    assert tuple(labels.shape) == (20, 17, 8) and bool((labels == 2).all())
