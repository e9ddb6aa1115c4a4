"""A plausibility check that an image holds CT intensities in Hounsfield units.

Models trained on CT window Hounsfield units; an MR image, a CT stored without its rescale
intercept or data already normalised to 0..1 runs without error but gives nonsense. The
check warns (never refuses): a CT cropped tightly inside the body may lack air, so only
images with no fat or air at all, with a tiny value range, holding only air (below -900 HU:
no body in the image) or a single value are flagged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

# Percentiles are taken on at most this many voxels (an even stride through the volume).
_SAMPLE_VOXELS = 1 << 21
# Fat is about -100 HU and air -1000 HU: a CT has voxels below this value.
_LOWEST_TISSUE_HU = -50.0
# A CT spans at least the ~1000 HU between air or fat and bone; normalised data spans ~1..10.
_MIN_HU_SPAN = 20.0
# Air is about -1000 HU; lung, the least dense tissue, lies above about -900 HU.
_AIR_HU = -900.0


def ct_intensity_warning(image: sitk.Image, path: str | Path | None = None) -> str | None:
    """A warning text naming ``path`` when ``image``'s intensities do not look like
    Hounsfield units (robust 0.5/99.5 percentiles), or None for a plausible CT."""
    array = sitk.GetArrayViewFromImage(image)
    flat = array.reshape(-1)
    sample = flat[:: max(1, flat.size // _SAMPLE_VOXELS)].astype(np.float64)
    sample = sample[np.isfinite(sample)]
    name = "image" if path is None else str(path)
    if sample.size == 0:
        return f"{name}: no finite intensities; is this a CT in Hounsfield units?"
    low, high = np.percentile(sample, [0.5, 99.5])
    found = f"0.5-99.5 percentiles {low:.4g} .. {high:.4g}"
    if high <= _AIR_HU:
        return (
            f"{name}: the image holds only air ({found} HU); no body to segment (a scan of "
            "the empty table, or a crop outside the body?)"
        )
    if high - low < 1e-6 * max(1.0, abs(float(high))):
        return (
            f"{name}: every voxel has the same intensity ({float(high):.4g}); a blank or "
            "empty image, not a CT"
        )
    if high - low < _MIN_HU_SPAN:
        return (
            f"{name}: intensities look normalised ({found}), not Hounsfield units; "
            "the model expects the raw CT"
        )
    if low >= _LOWEST_TISSUE_HU:
        return (
            f"{name}: no air or fat intensities ({found}); this looks like MR, or a CT "
            "without its rescale intercept, not Hounsfield units"
        )
    return None
