"""Where the time of one segmentation goes: seconds per stage of ``mtkd segment``'s pipeline.

    python bench/inference_profile.py --device cpu --out bench/results/profile_cpu.json
    python bench/inference_profile.py --volumes CT.nii.gz --student MODEL --repeats 3

For each volume, end to end as ``mtkd segment`` does it (read the file, ``Predictor.predict``,
write a ``.seg.nrrd``), with the stages the pipeline marks (:mod:`mtkd.infer.stages`):
read, foreground crop, host to device, resampling, orientation, normalisation, network,
softmax, probability copy, inverse mapping, argmax, device to host, label copy,
post-processing, to SimpleITK, write; "other" is the time outside any marked stage. On CUDA
the device is synchronised at every stage boundary, so asynchronous kernels are counted where
they run (this costs a little time itself). Median per stage over ``--repeats`` runs after one
warm-up.

Volumes: ``--volumes`` files, or the synthetic 512x512x224 phantom this script writes plus the
shared full-size CTs where they exist (``bench/inference_speed.py``'s defaults; a clone
without ``../shared/data`` gets the phantom only and is told so). Student: ``--student`` or
the small 3-D UNet ``bench/inference_speed.py`` trains (its ``--training-cts``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from inference_speed import (  # noqa: E402 - the sibling script's volumes and student
    TRAINING_CTS,
    default_volumes,
    machine,
    present,
    train_student,
)

from mtkd.data.image_io import read_image  # noqa: E402
from mtkd.data.segnrrd import write_segmentation  # noqa: E402
from mtkd.export.ort_backend import network_for_backend  # noqa: E402
from mtkd.infer.predictor import Predictor  # noqa: E402
from mtkd.infer.stages import StageTimes, stage  # noqa: E402
from mtkd.modelfiles.model_io import load_model  # noqa: E402

ORDER = [
    "read",
    "foreground crop",
    "host to device",
    "resampling",
    "orientation",
    "normalisation",
    "network",
    "softmax",
    "probability copy",
    "sliding-window stitching",
    "inverse mapping",
    "argmax",
    "device to host",
    "label copy",
    "post-processing",
    "to SimpleITK",
    "write",
    "other",
]


def profile_once(predictor: Predictor, volume: Path, output: Path) -> tuple[dict, float, str]:
    """Seconds per stage of one file-to-file segmentation, its total and the plan."""
    times = StageTimes(synchronize=predictor.device.type == "cuda")
    started = time.perf_counter()
    with times.total():
        with stage("read"):
            image = read_image(volume, keep_integer=True)
        prediction = predictor.predict(image)
        with stage("write"):
            write_segmentation(prediction.labelmap, predictor.model.labels, output)
    return dict(times.seconds), time.perf_counter() - started, prediction.plan


def profile_volume(predictor: Predictor, volume: Path, work: Path, repeats: int) -> dict:
    """Median seconds per stage (and in total) over ``repeats`` runs after a warm-up."""
    output = work / f"{volume.name.split('.')[0]}.seg.nrrd"
    profile_once(predictor, volume, output)  # warm-up: allocator, thread pools, page cache
    runs = [profile_once(predictor, volume, output) for _ in range(repeats)]
    stages = sorted({name for seconds, _, _ in runs for name in seconds}, key=_rank)
    image = read_image(volume)
    return {
        "volume": volume.name,
        "size": list(image.GetSize()),
        "spacing": [round(s, 3) for s in image.GetSpacing()],
        "plan": runs[0][2],
        "total_s": statistics.median(total for _, total, _ in runs),
        "stages_s": {
            name: statistics.median(seconds.get(name, 0.0) for seconds, _, _ in runs)
            for name in stages
        },
    }


def _rank(name: str) -> int:
    return ORDER.index(name) if name in ORDER else len(ORDER)


def markdown(report: dict) -> str:
    """One table per volume: stage, median seconds, share of the total."""
    lines = [
        f"{report['machine']}, {report['date']}, median of {report['repeats']} runs; "
        f"backend: {report['backend']}"
    ]
    for result in report["results"]:
        size = "×".join(str(s) for s in result["size"])
        lines += [
            "",
            f"{result['volume']} ({size}; {result['plan']}): {result['total_s']:.2f} s",
            "",
            "| stage | s | share |",
            "|---|---|---|",
        ]
        total = result["total_s"]
        for name, seconds in result["stages_s"].items():
            lines.append(f"| {name} | {seconds:.3f} | {100 * seconds / total:.0f} % |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--volumes", nargs="*", help="CT files (default: phantom + shared CTs)")
    parser.add_argument("--student", help="student model folder (default: train one)")
    parser.add_argument("--training-cts", nargs="+", help="CTs the default student trains on")
    parser.add_argument(
        "--backend",
        default="torch",
        choices=["torch", "onnxruntime", "auto"],
        help="the network's backend (mtkd segment --backend)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "mtkd-bench"))
    parser.add_argument("--out", help="write the JSON report here (and a .md table beside it)")
    args = parser.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if args.volumes:
        volumes = present([Path(v) for v in args.volumes], "--volumes")
        if not volumes:
            raise SystemExit("none of the --volumes exists")
    else:
        volumes = default_volumes(work, None)
    training = [Path(p) for p in args.training_cts] if args.training_cts else TRAINING_CTS
    student = Path(args.student) if args.student else train_student(work, training)
    model, backend = network_for_backend(load_model(student, device), args.backend, device)
    predictor = Predictor(model, device)
    report = {
        "machine": machine(device),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "student": str(student),
        "backend": backend,
        "results": [profile_volume(predictor, v, work, args.repeats) for v in volumes],
    }
    print(markdown(report))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        out.with_suffix(".md").write_text(markdown(report) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
