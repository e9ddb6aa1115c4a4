"""The time of post-processing on a full-size label map (512 x 512 x 224), per variant.

    python bench/postprocess_speed.py [--structures 5] [--islands 200] [--repeats 3]
        [--device numpy|cpu|cuda]

The label map is the bundled CT's TotalSegmentator segmentation (``Testing/Data``, 3 mm),
resampled by nearest neighbour onto a 512 x 512 x 224 grid of 0.7 x 0.7 x 1.5 mm: real anatomy
at the size of a clinical CT. Its ``--structures`` largest structures are kept (numbered 1..N)
and ``--islands`` small blobs of random structures are scattered over it, as a small student
leaves them. Each variant of ``bench/postprocess_effect.py`` then runs on it ``--repeats``
times (after one warm-up); the median seconds are printed, with the voxels each removed.
``--device numpy`` (the default) cleans the NumPy map with SciPy, as ``mtkd segment`` does on
the CPU; ``cpu`` or ``cuda`` clean a torch tensor there with torch ops, as the predictor does on
a GPU (the map is on the device before the clock starts, and the device is synchronised before
it stops); each variant's output is checked against SciPy's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from mtkd.infer.postprocess import PostProcessing, StructureRule

DATA = Path(__file__).resolve().parents[1] / "Testing" / "Data"
SIZE = (512, 512, 224)  # x, y, z
SPACING = (0.7, 0.7, 1.5)
VARIANTS = {
    "largest": StructureRule(largest_only=True),
    "min_1ml": StructureRule(min_volume_ml=1.0),
    "largest_fill": StructureRule(largest_only=True, fill_holes=True),
}


def full_size_labels(structures: int, islands: int, seed: int = 0) -> np.ndarray:
    """The label map described in the module docstring, as a (z, y, x) uint8 array."""
    source = sitk.ReadImage(str(DATA / "abdomen_seg_total_fast.nii.gz"))
    grid = sitk.Image(SIZE, sitk.sitkUInt8)
    grid.SetSpacing(SPACING)
    extent = np.array(source.GetSize()) * np.array(source.GetSpacing())
    grid.SetOrigin(source.TransformIndexToPhysicalPoint((0, 0, 0)))
    grid.SetDirection(source.GetDirection())
    if not np.all(np.array(SIZE) * np.array(SPACING) <= extent + 1e-6):
        print("note: the grid reaches past the source; outside is background", file=sys.stderr)
    resampled = sitk.Resample(source, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    array = sitk.GetArrayFromImage(resampled)
    values, counts = np.unique(array[array > 0], return_counts=True)
    kept = values[np.argsort(counts)[::-1][:structures]]
    labels = np.zeros(array.shape, np.uint8)
    for index, value in enumerate(kept, start=1):
        labels[array == value] = index
    rng = np.random.default_rng(seed)
    for _ in range(islands):
        z, y, x = (int(rng.integers(0, n - 4)) for n in labels.shape)
        labels[z : z + 3, y : y + 4, x : x + 4] = int(rng.integers(1, structures + 1))
    return labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--structures", type=int, default=5)
    parser.add_argument("--islands", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="numpy", choices=["numpy", "cpu", "cuda"])
    args = parser.parse_args(argv)
    labels = full_size_labels(args.structures, args.islands)
    spacing = tuple(reversed(SPACING))  # the array's axes are (z, y, x)
    print(f"label map {labels.shape[::-1]} (x, y, z), {args.structures} structures, "
          f"{np.count_nonzero(labels)} labelled voxels")  # fmt: skip
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here")
    on_device = None if args.device == "numpy" else torch.from_numpy(labels).to(args.device)
    print(f"cleaned with {'SciPy' if on_device is None else 'torch on ' + args.device}")
    print("| variant | median seconds | voxels removed | voxels added |")
    print("|---|---|---|---|")
    for name, rule in VARIANTS.items():
        postprocessing = PostProcessing({v: rule for v in range(1, args.structures + 1)})
        cleaned = postprocessing.apply(labels, spacing)  # warm-up, and the reference
        if on_device is not None:
            on_device_cleaned = postprocessing.apply(on_device, spacing).cpu().numpy()
            if not np.array_equal(on_device_cleaned, cleaned):
                print(f"{name}: torch and SciPy differ", file=sys.stderr)
                return 1
        seconds = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            postprocessing.apply(labels if on_device is None else on_device, spacing)
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - started)
        removed = int(np.count_nonzero((labels > 0) & (cleaned == 0)))
        added = int(np.count_nonzero((labels == 0) & (cleaned > 0)))
        print(f"| {name} | {statistics.median(seconds):.3f} | {removed} | {added} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
