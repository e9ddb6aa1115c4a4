"""Where the label mapping should stop interpolating border voxels one by one and interpolate
every voxel instead (``mtkd.infer.label_mapping.DENSE_ABOVE``).

    python bench/label_mapping_crossover.py [--threads 2] [--repeats 4] [--out FILE.json]

Probability maps of 4 channels on a 267x267xZ model grid (softmax of random logits on a
coarse grid, trilinearly upsampled: the coarser, the fewer label borders), mapped back onto a
512x512xZ grid by ``GridMapping.to_original`` (the predictor's inverse), once with every
border voxel interpolated alone and once with the dense pass. Prints, per map, the share of
source voxels on a label border and the fastest of ``--repeats`` runs of each path; the
crossover is where the dense column becomes the smaller one. Needs nothing but the engine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date

import torch
import torch.nn.functional as F

from mtkd.infer import label_mapping
from mtkd.infer.grid_mapping import GridMapping

CHANNELS, SOURCE, TARGET = 4, 267, 512


def mapping(slices: int) -> GridMapping:
    """In-plane upsampling SOURCE -> TARGET (centred, as MONAI's Spacing), slices kept."""
    scale = (TARGET - 1) / (SOURCE - 1) * 0.999
    offset = ((TARGET - 1) - scale * (SOURCE - 1)) / 2
    return GridMapping(
        original_size=(TARGET, TARGET, slices),
        permutation=(0, 1, 2),
        flips=(False, False, False),
        oriented_size=(TARGET, TARGET, slices),
        resampled_size=(SOURCE, SOURCE, slices),
        scale=(scale, scale, 1.0),
        offset=(offset, offset, 0.0),
        crop_start=(0, 0, 0),
        crop_stop=(SOURCE, SOURCE, slices),
        resized=None,
        pad_before=(0, 0, 0),
        pad_after=(0, 0, 0),
        model_size=(SOURCE, SOURCE, slices),
    )


def probabilities(coarse: int, slices: int, generator: torch.Generator) -> torch.Tensor:
    """(C, SOURCE, SOURCE, slices) softmax of logits drawn on a grid ``coarse`` times coarser."""
    size = (max(SOURCE // coarse, 2), max(SOURCE // coarse, 2), max(slices // coarse, 2))
    logits = 4 * torch.randn((1, CHANNELS, *size), generator=generator)
    fine = F.interpolate(logits, size=(SOURCE, SOURCE, slices), mode="trilinear")
    return fine[0].softmax(0).contiguous()


def border_share(probs: torch.Tensor) -> float:
    """Share of source voxels whose in-plane neighbour has another label (the figure the
    label mapping compares with DENSE_ABOVE)."""
    labels = label_mapping.labels_of(probs, "softmax")
    coords = torch.linspace(0, SOURCE - 1, TARGET, dtype=torch.float64)
    reads = [label_mapping._neighbours(coords, SOURCE)] * 2 + [None]
    return label_mapping._border_share(labels, reads)


def fastest(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--slices", type=int, default=112)
    parser.add_argument("--coarse", type=int, nargs="+", default=[64, 32, 20, 16, 12, 8, 4])
    parser.add_argument("--out", help="write the rows here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    grid = mapping(args.slices)
    generator = torch.Generator().manual_seed(0)
    chosen = label_mapping.DENSE_ABOVE
    rows = []
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads, {date.today()}")
    print("| border share | border voxels alone s | dense s | faster |\n|---|---|---|---|")
    try:
        for coarse in args.coarse:
            probs = probabilities(coarse, args.slices, generator)
            seconds = {}
            for path, threshold in (("sparse", 1.0), ("dense", -1.0)):
                label_mapping.DENSE_ABOVE = threshold
                seconds[path] = fastest(
                    lambda p=probs: grid.to_original(p, "softmax"), args.repeats
                )
            share = border_share(probs)
            faster = min(seconds, key=seconds.get)
            rows.append({"coarse": coarse, "border_share": share, **seconds})
            print(f"| {share:.3f} | {seconds['sparse']:.2f} | {seconds['dense']:.2f} | {faster} |")
    finally:
        label_mapping.DENSE_ABOVE = chosen
    if args.out:
        with open(args.out, "w") as file:
            json.dump({"threads": args.threads, "date": str(date.today()), "rows": rows}, file)


if __name__ == "__main__":
    main()
