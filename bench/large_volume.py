"""Peak memory and time of ``mtkd segment`` on a very large CT (default 512x512x1200 int16).

    python bench/large_volume.py [--work DIR] [--size 512 512 1200] [--models 2d 3d]
        [--format .nii.gz|.nrrd|.seg.nrrd] [--package DIR] [--json OUT.json]

Writes a synthetic CT (body, liver, spleen and two kidneys as ellipsoids of HU values, noise;
spacing 0.8 x 0.8 x 1.0 mm) as an uncompressed NRRD, exports two small models with random
weights whose batch-norm statistics come from the phantom (so that their output has
structure), and runs ``python -m mtkd segment MODEL CT -o OUT.nii.gz --device cpu`` in a child
process for each, printing the child's peak resident memory (``ru_maxrss`` from ``wait4``),
the stated bound for it (``mtkd.infer.memory.segmentation_memory_bound`` plus the process
baseline, the image held as int16 as ``mtkd segment`` keeps it) and the wall time:

- ``2d``: thesis U-Net 8/16 (bottleneck 32), axial slices resized to 64x64, no resampling;
- ``3d``: MONAI UNet 8/16/32 with batch norm at 4 mm, patch 64x64x64.

The network input is small on purpose: what costs memory on a large volume is reading,
preprocessing, mapping back onto the full-resolution grid and writing. ``--package DIR`` runs
the child on another version of the package (for a before/after comparison on the same
machine: ``mkdir DIR && git archive HEAD mtkd | tar -x -C DIR``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from mtkd.data.labels import LabelTable
from mtkd.data.preprocess import Preprocessing
from mtkd.infer.memory import (
    PROCESS_BASELINE_BYTES,
    InferencePlan,
    segmentation_memory_bound,
)
from mtkd.infer.model_input import ModelInput, preprocess
from mtkd.infer.predictor import Predictor
from mtkd.modelfiles.model_io import export_model, load_model
from mtkd.models import build_teacher

LABELS = LabelTable({1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left"})
SPACING = (0.8, 0.8, 1.0)
HU_WINDOW = (-160.0, 240.0)
# (centre as fractions of the extent (x, y, z), semi-axes in mm, HU) of each structure
ORGANS = [
    ((0.38, 0.45, 0.5), (70.0, 55.0, 150.0), 60.0),  # liver
    ((0.66, 0.40, 0.5), (35.0, 30.0, 70.0), 45.0),  # spleen
    ((0.40, 0.62, 0.45), (20.0, 25.0, 50.0), 30.0),  # kidney_right
    ((0.62, 0.62, 0.45), (20.0, 25.0, 50.0), 30.0),  # kidney_left
]
MODELS = {
    "2d": (
        {
            "name": "thesis_unet",
            "params": {"spatial_dims": 2, "in_channels": 1, "out_channels": 5},
            "extra": {"channels": [8, 16], "bottleneck": 32},
        },
        {"dims": 2, "spacing": None, "slice_size": [64, 64], "patch_size": [64, 64, 64]},
    ),
    "3d": (
        {
            "name": "unet",
            "params": {"spatial_dims": 3, "in_channels": 1, "out_channels": 5},
            "extra": {
                "channels": [8, 16, 32],
                "strides": [2, 2],
                "num_res_units": 1,
                "norm": "BATCH",
            },
        },
        {"dims": 3, "spacing": [4.0, 4.0, 4.0], "slice_size": [64, 64], "patch_size": [64] * 3},
    ),
}


def synthetic_ct(path: Path, size=(512, 512, 1200), spacing=SPACING, seed: int = 0) -> Path:
    """Write an int16 CT phantom of ``size`` (x, y, z) voxels: air (-1000 HU), an elliptic
    body cylinder (0 HU) holding the ``ORGANS`` ellipsoids, Gaussian noise (sd 10 HU).

    Built slice by slice, so that only the int16 volume is ever whole in memory.
    """
    nx, ny, nz = size
    rng = np.random.default_rng(seed)
    x = np.arange(nx, dtype=np.float32)[None, :] * spacing[0]
    y = np.arange(ny, dtype=np.float32)[:, None] * spacing[1]
    extent = [s * d for s, d in zip(size, spacing, strict=True)]
    body = ((x - extent[0] / 2) / (0.42 * extent[0])) ** 2
    body = body + ((y - extent[1] / 2) / (0.33 * extent[1])) ** 2 < 1.0
    noise = rng.normal(0.0, 10.0, (8, ny, nx)).astype(np.float32)  # reused: cheap to build
    volume = np.empty((nz, ny, nx), dtype=np.int16)
    for k in range(nz):
        plane = np.where(body, 0.0, -1000.0).astype(np.float32)
        z = k * spacing[2]
        for centre, axes, hu in ORGANS:
            dz = ((z - centre[2] * extent[2]) / axes[2]) ** 2
            if dz >= 1.0:
                continue
            inside = ((x - centre[0] * extent[0]) / axes[0]) ** 2
            inside = inside + ((y - centre[1] * extent[1]) / axes[1]) ** 2 + dz < 1.0
            plane[inside] = hu
        volume[k] = np.rint(plane + noise[k % len(noise)])
    image = sitk.GetImageFromArray(volume)
    del volume
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path), useCompression=False)
    return path


def calibrate(network: nn.Module, prep: Preprocessing, image: sitk.Image) -> None:
    """Set the batch-norm statistics from one pass over ``image`` (random weights then give
    output that follows the image)."""
    volume, _ = preprocess(image, prep)
    if prep.dims == 2:
        batch = volume.permute(3, 0, 1, 2)
    else:  # whole multiples of the network's size divisor
        batch = volume[None, :, : volume.shape[1] // 8 * 8, : volume.shape[2] // 8 * 8]
        batch = batch[..., : volume.shape[3] // 8 * 8]
    for module in network.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None
    network.train()
    with torch.no_grad():
        network(batch)
    network.eval()


def export_random_model(kind: str, folder: Path, sample: sitk.Image) -> Path:
    """Model folder ``folder`` of ``MODELS[kind]`` with random weights, calibrated on
    ``sample`` (a small CT)."""
    spec, fields = MODELS[kind]
    params = {**spec["params"], **spec["extra"]}
    prep = Preprocessing.from_dict(
        {"hu_window": list(HU_WINDOW), "crop_foreground": True, "in_channels": 1, **fields}
    )
    torch.manual_seed(0)
    network = build_teacher(spec["name"], reconstruction="none", **params)
    calibrate(network, prep, sample)
    return export_model(
        network,
        folder,
        spec={"name": spec["name"], "params": params, "reconstruction": "none"},
        labels=LABELS,
        prep=prep,
        activation="softmax",
        lineage={"kind": "benchmark", "weights": "random, batch norm calibrated"},
        name=f"large-volume-{kind}",
    )


# Per model: the z range of a part of the CT, and the z range inside it compared with the
# labels of the whole. 3-D: 256 slices are 64 model slices at 4 mm (the patch size: no
# padding), from model slice 120 (a multiple of the network's size divisor 4, so its strided
# convolutions sample the same positions), compared 20 model slices away from the ends.
PARTS = {"2d": (588, 612, 588, 612), "3d": (480, 736, 560, 656)}


def agreement_on_part(
    predictor: Predictor, image: sitk.Image, labels: sitk.Image, kind: str
) -> float:
    """Fraction of equal voxels between ``labels`` (the segmentation of all of ``image``) and
    ``predictor``'s segmentation of a z part of ``image`` (``PARTS[kind]``), compared away
    from the part's ends: 1.0 when the whole was segmented right. A 2-D model segments each
    slice on its own (the crop does not change: every slice holds the body); the 3-D part
    lies on the whole's grid and holds the network's field of view of the compared slices."""
    start, stop, first, last = PARTS[kind]
    size = list(image.GetSize())
    part = sitk.RegionOfInterest(image, [*size[:2], stop - start], [0, 0, start])
    of_part = sitk.GetArrayFromImage(predictor.predict(part).labelmap)
    of_whole = sitk.GetArrayViewFromImage(labels)
    return float((of_part[first - start : last - start] == of_whole[first:last]).mean())


@dataclass(frozen=True)
class ChildRun:
    """A finished child process: exit status, output, peak resident memory, wall time."""

    returncode: int
    stdout: str
    stderr: str
    peak_rss_bytes: int
    seconds: float


# Runs argv[2:] as its child and writes that child's ru_maxrss (KiB) to the file argv[1].
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as report:
    report.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status) % 256)
"""


def run_with_peak_memory(
    argv: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None
) -> ChildRun:
    """Run ``argv`` to completion; its own peak resident memory and wall time. Output goes
    through temporary files, not pipes.

    Linux counts into a process's ``ru_maxrss`` the memory of the process it was forked from
    (up to its ``exec``), so a child of a large process (a test runner) would report at least
    that. ``argv`` therefore runs as the child of a small Python launcher, which reports the
    ``ru_maxrss`` of ``wait4``: the command's own peak.
    """
    with (
        tempfile.TemporaryFile("w+") as out,
        tempfile.TemporaryFile("w+") as err,
        tempfile.TemporaryDirectory() as folder,
    ):
        report = Path(folder) / "maxrss"
        started = time.perf_counter()
        launcher = [sys.executable, "-c", _LAUNCHER, str(report), *map(str, argv)]
        returncode = subprocess.run(launcher, stdout=out, stderr=err, env=env, cwd=cwd).returncode
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        peak = int(report.read_text()) * 1024 if report.is_file() else 0
        return ChildRun(returncode, out.read(), err.read(), peak, seconds)


def segment_command(model: Path, image: Path, output: Path) -> list[str]:
    """``python -m mtkd segment`` on the CPU."""
    command = [sys.executable, "-m", "mtkd", "segment", str(model), str(image)]
    return command + ["-o", str(output), "--device", "cpu"]


def prepare(work: Path, size: tuple[int, int, int], kinds: list[str]) -> tuple[Path, dict]:
    """The CT of ``size`` and a model folder per kind in ``work`` (made once, then reused)."""
    ct = work / ("ct_" + "x".join(map(str, size)) + ".nrrd")
    if not ct.is_file():
        synthetic_ct(ct, size)
    sample_path = work / "sample.nrrd"
    if not sample_path.is_file():
        synthetic_ct(sample_path, (128, 128, 64), tuple(s * 4 for s in SPACING))
    sample = sitk.ReadImage(str(sample_path))
    models = {}
    for kind in kinds:
        models[kind] = work / f"model_{kind}"
        if not (models[kind] / "mtkd_model.json").is_file():
            export_random_model(kind, models[kind], sample)
    return ct, models


def memory_bound(model: Path, image: sitk.Image) -> tuple[int, InferencePlan]:
    """The stated bound (bytes) of ``mtkd segment`` with ``model`` on ``image`` held in its
    stored type, as ``mtkd segment`` holds integer CTs (the process baseline plus
    :func:`segmentation_memory_bound`), and the plan."""
    predictor = Predictor(load_model(model))
    plan = predictor.plan(ModelInput(image, predictor.model.prep).mapping.model_size)
    voxels = image.GetNumberOfPixels()
    image_bytes = voxels * image.GetSizeOfPixelComponent()
    return PROCESS_BASELINE_BYTES + segmentation_memory_bound(image_bytes, voxels, plan), plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="folder for the CT, models and outputs")
    parser.add_argument("--size", type=int, nargs=3, default=[512, 512, 1200])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument(
        "--package",
        type=Path,
        help="run the child in this folder holding another version of the mtkd package, "
        "to measure it (e.g. made by: git archive HEAD mtkd | tar -x -C DIR)",
    )
    parser.add_argument(
        "--format", default=".nii.gz", choices=[".nii.gz", ".nrrd", ".seg.nrrd"], help="output"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    work = (args.work or Path(tempfile.mkdtemp(prefix="mtkd_large_"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    ct, models = prepare(work, tuple(args.size), args.models)
    env = dict(os.environ)
    if args.package:  # python -m puts the working folder first on sys.path
        env["PYTHONPATH"] = str(args.package.resolve())
    image = sitk.ReadImage(str(ct))
    results = []
    for kind in args.models:
        output = work / f"labels_{kind}{args.format}"
        command = segment_command(models[kind], ct, output)
        run = run_with_peak_memory(command, env, cwd=args.package)
        if run.returncode != 0:
            print(run.stderr, file=sys.stderr)
            return run.returncode
        result = {
            "model": kind,
            "image": "x".join(map(str, args.size)) + " int16",
            "output_format": args.format,
            "peak_rss_gib": round(run.peak_rss_bytes / 2**30, 3),
            "bound_gib": round(memory_bound(models[kind], image)[0] / 2**30, 3),
            "wall_s": round(run.seconds, 1),
            "output": run.stdout.strip().splitlines()[-1],
            "package": str(args.package or Path(__file__).resolve().parents[1]),
        }
        results.append(result)
        print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
