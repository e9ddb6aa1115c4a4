"""Connected parts and enclosed holes of a mask with plain torch ops, on the mask's device.

The CPU path of :mod:`mtkd.infer.postprocess` uses SciPy; on a GPU, copying the label map to
the host and back would cost more than cleaning it. The parts are found by FastSV (Zhang,
Azad and Hu, "FastSV: a distributed-memory connected component algorithm with fast
convergence", 2020), with "largest" where the paper has "smallest": every voxel of the mask
has a parent (at first itself, by its flat index + 1); each round, every voxel looks at the
largest grandparent among itself and its neighbours (a separable 3x3x3 max for 26-connectivity,
the max of three 1-D ones for 6) and hooks both itself and its parent onto it (a scatter-max),
then takes its grandparent if that is larger. Parents only grow and always lie in the voxel's
own part, and when a round changes nothing every part points at its largest voxel. The number
of rounds grows with the log of a part's length (9-11 rounds for the organs of a 512 x 512 x 224
label map, against 136 for growing alone), and a round is a dozen elementwise passes.
"""

from __future__ import annotations

import torch

__all__ = ["connected_parts", "enclosed_holes", "part_sizes"]


def _max_along(ids: torch.Tensor, dim: int) -> torch.Tensor:
    """Per voxel, the max of itself and its two neighbours along ``dim`` (same shape)."""
    out = ids.clone()
    n = ids.shape[dim]
    if n > 1:
        upper, lower = ids.narrow(dim, 1, n - 1), ids.narrow(dim, 0, n - 1)
        torch.maximum(out.narrow(dim, 1, n - 1), lower, out=out.narrow(dim, 1, n - 1))
        torch.maximum(out.narrow(dim, 0, n - 1), upper, out=out.narrow(dim, 0, n - 1))
    return out


def _neighbourhood_max(ids: torch.Tensor, connectivity: int) -> torch.Tensor:
    """Max over each voxel and its neighbours: through faces, edges and corners (26, the
    3x3x3 box: separable) or through faces only (6)."""
    if connectivity == 26:
        for dim in range(ids.ndim):
            ids = _max_along(ids, dim)
        return ids
    out = _max_along(ids, 0)
    for dim in range(1, ids.ndim):
        torch.maximum(out, _max_along(ids, dim), out=out)
    return out


def connected_parts(mask: torch.Tensor, connectivity: int = 26) -> torch.Tensor:
    """Part ids of a 3-D bool ``mask`` (X, Y, Z): an integer tensor of the same shape (int32,
    int64 beyond 2**31 voxels), 0 outside the mask, one id per connected part (parts touch
    through faces, edges and corners with ``connectivity`` 26, through faces with 6): the flat
    index + 1 of the part's last voxel."""
    if connectivity not in (6, 26):
        raise ValueError(f"connectivity must be 6 or 26, got {connectivity}")
    if mask.ndim != 3 or mask.dtype != torch.bool:
        raise ValueError(f"expected a 3-D bool mask, got {tuple(mask.shape)} {mask.dtype}")
    dtype = torch.int32 if mask.numel() < 2**31 - 1 else torch.int64
    inside = torch.nonzero(mask.reshape(-1)).flatten()  # flat indices of the mask's voxels
    parents = torch.zeros(mask.numel(), dtype=dtype, device=mask.device)
    parents[inside] = (inside + 1).to(dtype)
    while True:  # each temporary is dropped as soon as it is used: a GPU's memory is short
        parent = parents[inside].long().sub_(1)  # the parent's flat index, per voxel inside
        spread = torch.zeros_like(parents)
        spread[inside] = parents[parent]  # the grandparent, on the grid
        reach = _neighbourhood_max(spread.view(mask.shape), connectivity).view(-1)
        del spread
        reach = reach[inside]
        hooked = parents.scatter_reduce(0, parent, reach, "amax")
        del parent
        hooked[inside] = torch.maximum(hooked[inside], reach)  # reach >= the grandparent
        del reach
        if torch.equal(hooked, parents):
            return parents.view(mask.shape)
        parents = hooked


def part_sizes(parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, voxel counts) of the parts in ``parts`` (from :func:`connected_parts`), both
    int64 (P,), in increasing id order; background (0) left out."""
    ids, counts = torch.unique(parts[parts > 0], return_counts=True)
    return ids, counts


def enclosed_holes(mask: torch.Tensor) -> torch.Tensor:
    """The voxels outside the 3-D bool ``mask`` that it encloses: the parts of its outside
    (connected through faces) that do not reach the array's border. Bool, same shape."""
    outside = connected_parts(~mask, connectivity=6)
    border = torch.zeros_like(mask)
    for dim in range(mask.ndim):
        border.select(dim, 0).fill_(True)
        border.select(dim, mask.shape[dim] - 1).fill_(True)
    reaching = torch.unique(outside[border & ~mask])
    return ~mask & ~torch.isin(outside, reaching)
