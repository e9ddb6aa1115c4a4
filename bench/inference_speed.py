"""Inference speed: our predictor against MONAI's default sliding window, and a small 3-D
student against two large teachers, on real full-size CT and a synthetic 512x512x224 volume.

    python bench/inference_speed.py --device cpu  --out bench/results/inference_cpu.json
    python bench/inference_speed.py --device cuda --out bench/results/inference_gpu.json

For each volume, end to end (image file -> label map on the input grid):

- ``ours``: ``mtkd.infer.predictor.Predictor`` with the student (1.5 mm, whole volume when it
  fits the memory budget);
- ``monai``: the same student weights through MONAI's usual pipeline: LoadImaged,
  Orientationd, Spacingd, ScaleIntensityRanged, ``sliding_window_inference`` with MONAI's
  defaults (roi 96, overlap 0.25, window batch 4; fp16 autocast on CUDA), Invertd, argmax;
- ``swinunetr48`` and ``dynunet_nnunet``: the teachers through our predictor.

The student is a MONAI UNet (8/16/32/64 channels, batch norm) trained here for a few minutes
to segment body, lung and bone from threshold-derived labels, so that it gives structured
output on every CT (the speed and the agreement of the two pipelines are the point, not its
accuracy).
The teachers have random weights: their output does not matter for speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from mtkd.config import RunConfig
from mtkd.data.image_io import read_image, write_image
from mtkd.data.labels import LabelTable
from mtkd.data.preprocess import Preprocessing
from mtkd.engine.trainer import Trainer
from mtkd.export.ort_backend import network_for_backend
from mtkd.infer.memory import PeakMemory
from mtkd.infer.predictor import Predictor
from mtkd.modelfiles.model_io import export_model, load_model
from mtkd.models import build_network

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SPACING = (1.5, 1.5, 1.5)
HU_WINDOW = (-1000.0, 1000.0)
STRUCTURES = {"1": "body", "2": "lung", "3": "bone"}
STUDENT = {
    "name": "unet",
    "params": {
        "channels": [8, 16, 32, 64],
        "strides": [2, 2, 2],
        "num_res_units": 1,
        "norm": "BATCH",
    },
}
TEACHERS = {
    "swinunetr48": {"name": "swinunetr", "params": {"feature_size": 48}},
    "dynunet_nnunet": {
        "name": "dynunet",
        "params": {"strides": [1, 2, 2, 2, 2, 2], "filters": [32, 64, 128, 256, 320, 320]},
    },
}
TRAINING_CTS = [
    ROOT / "Testing" / "Data" / "abdomen_ct.nii.gz",
    SHARED / "pyradiomics" / "lung1_ct_1p5mm.nii.gz",
    SHARED / "pyradiomics" / "lung2_ct_1p5mm.nii.gz",
    SHARED / "totalsegmentator" / "C_thorax" / "ct_3mm.nii.gz",
]


# --- the student: a tiny 3-D UNet trained on threshold labels ---------------------------------


def threshold_labels(ct: sitk.Image) -> sitk.Image:
    """1 body (soft tissue), 2 lung (air inside the body), 3 bone, on the CT's grid."""
    from scipy import ndimage

    hu = sitk.GetArrayFromImage(ct)
    body = hu > -500
    components, count = ndimage.label(body)
    if count:
        sizes = ndimage.sum(body, components, range(1, count + 1))
        body = components == (1 + int(np.argmax(sizes)))
    filled = np.stack([ndimage.binary_fill_holes(s) for s in body])
    labels = np.zeros(hu.shape, np.uint8)
    labels[filled] = 1
    labels[filled & (hu < -400)] = 2
    labels[filled & (hu > 250)] = 3
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(ct)
    return image


def present(paths: list[Path], what: str) -> list[Path]:
    """The files of ``paths`` that exist; says which are missing (``what`` they are for)."""
    missing = [path for path in paths if not path.is_file()]
    if missing:
        shared = (
            " (the shared test volumes, which a plain clone lacks)"
            if any(SHARED in path.parents for path in missing)
            else ""
        )
        names = ", ".join(str(path) for path in missing)
        print(f"{what}: not found, left out{shared}: {names}", file=sys.stderr)
    return [path for path in paths if path.is_file()]


def train_student(work: Path, training_cts: list[Path], epochs: int = 12) -> Path:
    """Train (once; reused afterwards) the benchmark student on ``training_cts`` (at least
    two: one validates) for ``epochs`` and return its model folder."""
    run_dir = work / ("student" if epochs == 12 else f"student-{epochs}ep")
    if (run_dir / "model" / "mtkd_model.json").is_file():
        return run_dir / "model"
    found = present(training_cts, "the student's training CTs")
    if len(found) < 2:
        raise SystemExit(
            f"the benchmark student trains on at least 2 CTs and {len(found)} of "
            f"{len(training_cts)} exist; pass --training-cts CT CT ... or --student MODEL"
        )
    data = work / "student_data"
    cases = []
    for path in found:
        case = path.name.split(".")[0]
        ct = read_image(path)
        (data / "images").mkdir(parents=True, exist_ok=True)
        (data / "labels").mkdir(parents=True, exist_ok=True)
        write_image(ct, data / "images" / f"{case}.nii.gz")
        write_image(threshold_labels(ct), data / "labels" / f"{case}.nii.gz")
        cases.append(case)
    (data / "labels.json").write_text(json.dumps(STRUCTURES))
    config = RunConfig.from_dict(
        {
            "kind": "train",
            "name": "bench-student",
            "data": {
                "source": str(data),
                "labels_json": str(data / "labels.json"),
                "dims": 3,
                "spacing": list(SPACING),
                "hu_window": list(HU_WINDOW),
                "crop_foreground": False,
                "patch_size": [64, 64, 64],
                "patches_per_volume": 8,
            },
            "split": {"fixed": {"train": cases[:-1], "val": cases[-1:], "test": []}},
            "model": STUDENT,
            "train": {
                "epochs": epochs,
                "batch_size": 4,
                "optimizer": {"name": "adamw", "lr": 3e-3},
                "val_every": epochs,
            },
        }
    )
    Trainer(config, run_dir, progress=False).run()
    return run_dir / "model"


def random_teacher(work: Path, key: str, student: Path) -> Path:
    """A teacher network with random weights exported as a model folder (speed only)."""
    folder = work / key
    if (folder / "mtkd_model.json").is_file():
        return folder
    spec = TEACHERS[key]
    reference = load_model(student)
    params = {"spatial_dims": 3, "in_channels": 1, "out_channels": 4, **spec["params"]}
    torch.manual_seed(0)
    network = build_network(spec["name"], **params)
    prep = Preprocessing.from_dict({**reference.prep.to_dict(), "patch_size": [96, 96, 96]})
    export_model(
        network,
        folder,
        spec={"name": spec["name"], "params": params, "reconstruction": "none"},
        labels=reference.labels,
        prep=prep,
        activation="softmax",
        lineage={"kind": "benchmark", "weights": "random"},
        name=key,
    )
    return folder


# --- the volumes ---------------------------------------------------------------------------


def synthetic_volume(path: Path, size=(512, 512, 224), spacing=(0.78, 0.78, 1.5)) -> Path:
    """A 512x512x224 chest-like phantom in HU: air, body, two lungs, spine, noise."""
    if path.is_file():
        return path
    rng = np.random.default_rng(0)
    nx, ny, nz = size
    x = (np.arange(nx) - nx / 2) * spacing[0]
    y = (np.arange(ny) - ny / 2) * spacing[1]
    yy, xx = np.meshgrid(y, x, indexing="ij")  # (y, x)
    slice_hu = np.full((ny, nx), -1000.0, np.float32)
    slice_hu[(xx / 170) ** 2 + (yy / 120) ** 2 < 1] = 40.0
    for side in (-1, 1):
        slice_hu[((xx - side * 75) / 60) ** 2 + ((yy + 10) / 80) ** 2 < 1] = -850.0
    slice_hu[((xx) / 18) ** 2 + ((yy - 80) / 18) ** 2 < 1] = 700.0
    volume = np.repeat(slice_hu[None], nz, axis=0)
    volume += rng.normal(0.0, 20.0, volume.shape).astype(np.float32)
    image = sitk.GetImageFromArray(volume.astype(np.int16))
    image.SetSpacing(spacing)
    write_image(image, path)
    return path


def default_volumes(work: Path, carry: Path | None) -> list[Path]:
    if carry is not None:  # the device machine: compressed copies carried along
        found = sorted(carry.glob("*_image.nii.gz")) + sorted(carry.glob("totalseg_*.nii.gz"))
    else:
        found = [
            SHARED / "fullsize" / "pyradiomics_lung1_image.nrrd",
            SHARED / "fullsize" / "pyradiomics_lung2_image.nrrd",
            SHARED / "fullsize" / "totalseg_thorax_1p5mm_ct.nii.gz",
        ]
    return [synthetic_volume(work / "synthetic_512.nii")] + present(found, "benchmark volumes")


def as_nifti(path: Path, work: Path) -> Path:
    """Both pipelines read the same compressed NIfTI (MONAI's NIfTI reader needs no ITK)."""
    if path.name.endswith((".nii.gz", ".nii")):
        return path
    target = work / (path.name.split(".")[0] + ".nii.gz")
    if not target.is_file():
        write_image(read_image(path), target)
    return target


# --- the two pipelines ---------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ours(predictor: Predictor, path: Path) -> tuple[np.ndarray, str]:
    prediction = predictor.predict(read_image(path))
    return sitk.GetArrayFromImage(prediction.labelmap).transpose(2, 1, 0), prediction.plan


class MonaiPipeline:
    """MONAI's usual inference recipe with its default sliding-window settings."""

    def __init__(self, network: torch.nn.Module, device: torch.device):
        from monai.transforms import (
            Compose,
            EnsureChannelFirstd,
            LoadImaged,
            Orientationd,
            ScaleIntensityRanged,
            Spacingd,
        )

        self.network = network.to(device).eval()
        self.device = device
        self.transforms = Compose(
            [
                LoadImaged(keys="image", image_only=False),
                EnsureChannelFirstd(keys="image"),
                Orientationd(keys="image", axcodes="RAS"),
                Spacingd(keys="image", pixdim=SPACING, mode="bilinear"),
                ScaleIntensityRanged(
                    keys="image",
                    a_min=HU_WINDOW[0],
                    a_max=HU_WINDOW[1],
                    b_min=0,
                    b_max=1,
                    clip=True,
                ),
            ]
        )

    def preprocess(self, path: Path) -> dict:
        return self.transforms({"image": str(path)})

    def infer(self, image: torch.Tensor) -> torch.Tensor:
        from monai.inferers import sliding_window_inference

        with (
            torch.inference_mode(),
            torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda"),
        ):
            return sliding_window_inference(
                image[None].to(self.device),
                roi_size=(96, 96, 96),
                sw_batch_size=4,
                predictor=self.network,
                overlap=0.25,
            )

    def __call__(self, path: Path) -> np.ndarray:
        from monai.data import MetaTensor
        from monai.transforms import Invertd

        image = self.preprocess(path)["image"]
        logits = self.infer(image)
        probabilities = torch.softmax(logits.float(), dim=1)[0].cpu()
        pred = MetaTensor(probabilities, affine=image.affine)
        pred.applied_operations = list(image.applied_operations)
        inverter = Invertd(
            keys="pred", transform=self.transforms, orig_keys="image", nearest_interp=False
        )
        back = inverter({"pred": pred, "image": image})["pred"]
        return back.argmax(dim=0).numpy().astype(np.uint8)


# --- measuring -----------------------------------------------------------------------------


def timed(function, device: torch.device, repeats: int):
    """(seconds of each repeat, peak memory bytes of the first, last result)."""
    seconds, peak, result = [], None, None
    for index in range(repeats):
        sync(device)
        with PeakMemory(device) as meter:
            started = time.perf_counter()
            result = function()
            sync(device)
            seconds.append(time.perf_counter() - started)
        peak = meter.peak_bytes if index == 0 else peak
    return seconds, peak, result


def dice_mean(a: np.ndarray, b: np.ndarray, labels: int) -> float:
    scores = []
    for value in range(1, labels + 1):
        x, y = a == value, b == value
        total = int(x.sum()) + int(y.sum())
        if total:
            scores.append(2.0 * int((x & y).sum()) / total)
    return float(np.mean(scores)) if scores else 1.0


def network_seconds(network, image: torch.Tensor, device, repeats: int, multiple: int) -> float:
    """Median seconds of one whole-volume forward pass (padded to ``multiple``)."""
    pad = [(-s) % multiple for s in image.shape[1:]]
    volume = torch.nn.functional.pad(image[None], [p for d in reversed(pad) for p in (0, d)])
    volume = volume.to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    runs = []
    for _ in range(repeats + 1):
        sync(device)
        started = time.perf_counter()
        with (
            torch.inference_mode(),
            torch.autocast("cuda", dtype=dtype, enabled=device.type == "cuda"),
        ):
            network(volume)
        sync(device)
        runs.append(time.perf_counter() - started)
    return statistics.median(runs[1:])


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def run(args: argparse.Namespace) -> dict:
    named = [Path(v) for v in args.volumes or [] if v != "synthetic"]
    if any(not path.is_file() for path in named):
        missing = ", ".join(str(path) for path in named if not path.is_file())
        raise SystemExit(f"--volumes: no such file: {missing}")
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    training_cts = [Path(p) for p in args.training_cts] if args.training_cts else TRAINING_CTS
    student_folder = (
        Path(args.student)
        if args.student
        else train_student(work, training_cts, args.student_epochs)
    )
    student = load_model(student_folder, device)
    labels = len(LabelTable.from_dict(student.metadata["labels"]))
    runs_as, backend = network_for_backend(student, args.backend, device)
    print(f"student backend: {backend}", file=sys.stderr)
    budget = None if args.memory_limit is None else int(args.memory_limit * (1 << 20))
    predictor = Predictor(runs_as, device, memory_budget_bytes=budget)
    baseline = MonaiPipeline(load_model(student_folder, device).network, device)
    teachers = {
        key: Predictor(load_model(random_teacher(work, key, student_folder), device), device)
        for key in args.teachers
    }
    carry = Path(args.carry) if args.carry else None
    if args.volumes:  # "synthetic" names the generated 512x512x224 volume
        synthetic = work / "synthetic_512.nii"
        volumes = [
            synthetic_volume(synthetic) if v == "synthetic" else Path(v) for v in args.volumes
        ]
    else:
        volumes = default_volumes(work, carry)
    results = []

    def report() -> dict:
        return _report(results, device, student, teachers, args.repeats)

    for source in volumes:
        path = as_nifti(source, work)
        size = read_image(path).GetSize()
        print(f"{source.name}: {size}", flush=True)
        ours(predictor, path)  # warm-up (cuDNN autotuning, first allocations)
        our_s, our_peak, (our_labels, plan) = timed(
            lambda p=path: ours(predictor, p), device, args.repeats
        )
        baseline(path)
        monai_s, monai_peak, monai_labels = timed(lambda p=path: baseline(p), device, args.repeats)
        preprocessed = baseline.preprocess(path)["image"].as_tensor()
        row = {
            "volume": source.name,
            "size": list(size),
            "model_grid": list(preprocessed.shape[1:]),
            "ours_plan": plan,
            "ours_s": statistics.median(our_s),
            "ours_runs_s": our_s,
            "ours_peak_bytes": our_peak,
            "monai_s": statistics.median(monai_s),
            "monai_runs_s": monai_s,
            "monai_peak_bytes": monai_peak,
            "dice_ours_vs_monai": dice_mean(our_labels, monai_labels, labels),
            "student_forward_s": network_seconds(
                student.network, preprocessed, device, args.repeats, student.size_multiple
            ),
            "monai_sliding_window_s": statistics.median(
                timed(lambda x=preprocessed: baseline.infer(x), device, args.repeats)[0]
            ),
        }
        row["speedup_end_to_end"] = row["monai_s"] / row["ours_s"]
        loaded = read_image(path)  # in memory: the predictor alone, without reading the file
        row["ours_predict_s"] = statistics.median(
            timed(lambda x=loaded: predictor.predict(x), device, args.repeats)[0]
        )
        if source in volumes[: args.teacher_volumes] or args.teacher_volumes < 0:
            for key, teacher in teachers.items():
                teacher.predict(read_image(path))  # warm-up
                seconds, peak, (_, teacher_plan) = timed(
                    lambda p=path, t=teacher: ours(t, p), device, args.repeats
                )
                row[f"{key}_s"] = statistics.median(seconds)
                row[f"{key}_peak_bytes"] = peak
                row[f"{key}_plan"] = teacher_plan
                row[f"{key}_vs_student"] = row[f"{key}_s"] / row["ours_s"]
                row[f"{key}_predict_s"] = statistics.median(
                    timed(lambda t=teacher, x=loaded: t.predict(x), device, args.repeats)[0]
                )
                row[f"{key}_predict_vs_student"] = row[f"{key}_predict_s"] / row["ours_predict_s"]
        print(json.dumps(row, indent=1), flush=True)
        results.append(row)
        if args.out:  # after every volume, so a cut-off run keeps what it measured
            save(report(), Path(args.out))
    return report()


def save(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report) + "\n")


def _report(results, device, student, teachers, repeats) -> dict:
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(device),
        "device": str(device),
        "torch": torch.__version__,
        "student_parameters": sum(p.numel() for p in student.network.parameters()),
        "teacher_parameters": {
            key: sum(p.numel() for p in t.model.network.parameters()) for key, t in teachers.items()
        },
        "repeats": repeats,
        "results": results,
    }


def markdown(report: dict) -> str:
    def mb(value):
        return "n/a" if value is None else f"{value / 2**20:,.0f}"

    lines = [
        f"{report['machine']} ({report['device']}, torch {report['torch']}), {report['date']}, "
        f"median of {report['repeats']}",
        "",
        "| volume | model grid | ours s | MONAI SW s | speed-up | Dice ours vs MONAI "
        "| student forward s | MONAI SW forward s | ours peak MiB | MONAI peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['volume']} {'x'.join(map(str, r['size']))} | "
            f"{'x'.join(map(str, r['model_grid']))} | {r['ours_s']:.2f} | {r['monai_s']:.2f} | "
            f"{r['speedup_end_to_end']:.1f}x | {r['dice_ours_vs_monai']:.4f} | "
            f"{r['student_forward_s']:.3f} | {r['monai_sliding_window_s']:.3f} | "
            f"{mb(r['ours_peak_bytes'])} | {mb(r['monai_peak_bytes'])} |"
        )
    keys = list(report["teacher_parameters"])
    if keys:
        lines += [
            "",
            "End to end (file -> label map) and, in brackets, the predictor alone (image in memory"
            " -> label map):",
            "",
            "| volume | student s | "
            + " | ".join(f"{k} s | {k} / student | {k} peak MiB" for k in keys)
            + " |",
            "|---|---|" + "---|---|---|" * len(keys),
        ]
        for r in report["results"]:
            if f"{keys[0]}_s" not in r:
                continue
            cells = " | ".join(
                f"{r[f'{k}_s']:.2f} ({r[f'{k}_predict_s']:.3f}) | {r[f'{k}_vs_student']:.1f}x "
                f"({r[f'{k}_predict_vs_student']:.1f}x) | {mb(r[f'{k}_peak_bytes'])}"
                for k in keys
            )
            student = f"{r['ours_s']:.2f} ({r['ours_predict_s']:.3f})"
            lines.append(f"| {r['volume']} | {student} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--volumes", nargs="*", help="CT files (default: fullsize + synthetic)")
    parser.add_argument("--student", help="student model folder (default: train one)")
    parser.add_argument(
        "--training-cts",
        nargs="+",
        help="CT files the student trains on when --student is not given (default: the bundled "
        "CT and three of the shared test volumes)",
    )
    parser.add_argument(
        "--student-epochs",
        type=int,
        default=12,
        help="epochs of the student trained when --student is not given",
    )
    parser.add_argument("--teachers", nargs="*", default=list(TEACHERS), choices=list(TEACHERS))
    parser.add_argument(
        "--teacher-volumes", type=int, default=-1, help="run the teachers on the first N only"
    )
    parser.add_argument(
        "--backend",
        default="torch",
        choices=["torch", "onnxruntime", "auto"],
        help="the student's backend in our predictor (mtkd segment --backend)",
    )
    parser.add_argument(
        "--memory-limit",
        type=float,
        metavar="MIB",
        help="the student's memory budget in our predictor (mtkd segment --memory-limit)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "mtkd-bench"))
    parser.add_argument("--carry", help="folder of carried volumes (device machine)")
    parser.add_argument("--out", help="write the JSON report here (and a .md table beside it)")
    args = parser.parse_args()
    report = run(args)
    print(markdown(report))
    if args.out:
        save(report, Path(args.out))


if __name__ == "__main__":
    main()
