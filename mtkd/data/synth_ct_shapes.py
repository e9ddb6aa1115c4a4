"""Shape primitives of the ``ct`` synthetic phantoms (:mod:`mtkd.data.synth_ct`): smooth random
fields and the deformed cavity frame in which organs are templates and vessels are tubes.
Arrays are ``(z, y, x)``."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["CavityFrame", "coarse_field"]


def coarse_field(rng, shape, cells=(4, 5, 5), scale=1.0) -> np.ndarray:
    """Smooth random float32 field of ``shape`` (about ``cells`` bumps per axis), std about
    ``scale``: smoothed white noise on a coarse grid, linearly upsampled one axis at a time."""
    coarse = ndimage.gaussian_filter(rng.standard_normal(tuple(c + 2 for c in cells)), 0.8)
    coarse *= scale / (coarse.std() + 1e-12)
    for axis, n in enumerate(shape):  # (..., c) @ (c, n): linear interpolation along the axis
        c = coarse.shape[axis]
        where = np.linspace(0.0, c - 1.0, n)
        low = np.minimum(where.astype(int), c - 2)
        weights = np.zeros((c, n))
        weights[low, np.arange(n)] = 1.0 - (where - low)
        weights[low + 1, np.arange(n)] = where - low
        coarse = np.moveaxis(np.moveaxis(coarse, axis, -1) @ weights, -1, axis)
    return coarse.astype(np.float32)


class CavityFrame:
    """Cavity-normalised coordinates of a subject, deformed by a smooth displacement field.

    ``x``, ``y`` are 0 at the body centre and 1 at the inner surface of the muscle wall; ``z``
    is 0 near the middle of the nominal scan range and 1 at its superior end. ``mm`` converts a
    length in mm to these units per axis.
    """

    def __init__(self, x, y, z, mm):
        self.x, self.y, self.z, self.mm = x, y, z, mm

    def template(self, rng, centre, axes, angle=0.0, wobble=0.12):
        """Signed shape function (< 0 inside) of a rotated ellipsoid with smooth surface bumps:
        ``rho - 1 - bumps`` with ``rho`` the ellipsoidal radius, bumps four random sinusoids."""
        cos, sin = np.cos(angle), np.sin(angle)
        dx, dy, dz = self.x - centre[0], self.y - centre[1], self.z - centre[2]
        u = (cos * dx + sin * dy) / axes[0]
        v = (-sin * dx + cos * dy) / axes[1]
        w = dz / axes[2]
        result = np.sqrt(u * u + v * v + w * w) - 1.0
        near = result < 4 * wobble  # the bumps (|bumps| <= 4 * wobble) only matter here
        u, v, w = u[near], v[near], w[near]
        bump = np.zeros_like(u)
        for _ in range(4):
            d = rng.standard_normal(3)
            d /= np.linalg.norm(d)
            bump += (
                rng.uniform(0.3, 1.0)
                * wobble
                * np.sin(
                    rng.uniform(1.5, 3.5) * (d[0] * u + d[1] * v + d[2] * w)
                    + rng.uniform(0, 2 * np.pi)
                )
            )
        result[near] -= bump
        return result

    def tube(self, points, radius_mm):
        """Distance (mm) to the polyline through ``points`` (cavity units) minus ``radius_mm``:
        < 0 inside a tube. ``radius_mm``: a number or an array of the grid's shape."""
        best = None
        scale = np.array(self.mm)
        for a, b in zip(points[:-1], points[1:], strict=True):
            a, b = np.array(a) * scale, np.array(b) * scale  # mm
            ab = b - a
            px, py, pz = (
                self.x * scale[0] - a[0],
                self.y * scale[1] - a[1],
                self.z * scale[2] - a[2],
            )
            t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / float(ab @ ab), 0.0, 1.0)
            d = np.sqrt((px - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2 + (pz - t * ab[2]) ** 2)
            best = d if best is None else np.minimum(best, d)
        return best - radius_mm
