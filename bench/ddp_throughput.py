"""Training throughput of distillation with 1..N data-parallel processes (torchrun).

Writes a SYNTHETIC cohort (``mtkd synth``), trains a small multi-task teacher once in one
process, then distils the thesis student S1 (InfoNCE at E/B/D + PMD) under
``torchrun --standalone --nproc_per_node P`` for every P given, and reports the samples per
second of the training epochs after the first (from ``events.jsonl``; validation excluded).

    python bench/ddp_throughput.py --device cuda --nproc 1 2 4 8 --amp --out ddp_gpu.json
    python bench/ddp_throughput.py --device cpu --nproc 1 2 --threads 1 --out ddp_cpu.json

On GPUs the processes use NCCL, on the CPU gloo. ``train.batch_size`` is per process, so the
work per step grows with P and the ideal is P times the samples per second of one process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

from mtkd.run_folder import read_events


def mtkd(*args: str, nproc: int | None = None, threads: int | None = None) -> None:
    command = [sys.executable, "-m", "mtkd", *args]
    if nproc is not None:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc_per_node", str(nproc), "-m", "mtkd", *args]
    environment = dict(os.environ)
    if threads:
        environment["OMP_NUM_THREADS"] = str(threads)
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}{result.stderr}")


def config(kind: str, cohort: Path, args: argparse.Namespace, **extra) -> dict:
    common = {
        "data": {"source": str(cohort), "dims": 2, "slice_size": [args.size, args.size]},
        "split": {"seed": 0, "val_fraction": 0.2, "student_fraction": 1.0},
        "train": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "device": args.device,
            "amp": args.amp,
            "val_every": args.epochs,
            "optimizer": {"name": "adamw", "lr": 0.003},
        },
    }
    return {"kind": kind, "name": kind, **common, **extra}


def throughput(run: Path) -> dict:
    """Samples per second over the epochs after the first, from the run's events."""
    events = read_events(run / "events.jsonl")
    epochs = [e for e in events if e["type"] == "metrics"][1:]
    training = next(e for e in events if e.get("state") == "training")
    samples = sum(e["samples"] for e in epochs)
    seconds = sum(e["seconds"] for e in epochs)
    return {
        "world_size": training["world_size"],
        "device": training["device"],
        "epochs_timed": len(epochs),
        "samples": samples,
        "seconds": round(seconds, 3),
        "samples_per_second": round(samples / seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/bench-ddp"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS per process")
    parser.add_argument("--subjects", type=int, default=12)
    parser.add_argument("--size", type=int, default=128, help="slice size (pixels)")
    parser.add_argument("--batch-size", type=int, default=16, help="per process")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    work = args.work
    cohort, teacher = work / "cohort", work / "teacher"
    if not cohort.exists():
        mtkd("synth", str(cohort), "--subjects", str(args.subjects), "--seed", "0")
    if not (teacher / "model").exists():
        spec = config(
            "train",
            cohort,
            args,
            model={"name": "thesis_unet", "params": {"channels": [16, 32, 64], "bottleneck": 128}},
            multitask={"reconstruction": "masked", "weight": 0.2},
        )
        spec["train"]["epochs"] = 1
        path = work / "teacher.yaml"
        path.write_text(yaml.safe_dump(spec))
        mtkd("train", str(path), "--run-dir", str(teacher), threads=args.threads)
    student = config(
        "distill",
        cohort,
        args,
        model={"name": "thesis_s1"},
        distill={"teacher": str(teacher), "preset": "thesis"},
    )
    path = work / "student.yaml"
    path.write_text(yaml.safe_dump(student))
    results = []
    for nproc in args.nproc:
        run = work / f"student-{nproc}-{time.strftime('%H%M%S')}"
        mtkd("distill", str(path), "--run-dir", str(run), nproc=nproc, threads=args.threads)
        results.append({"nproc": nproc, **throughput(run)})
        print(json.dumps(results[-1]))
    base = results[0]["samples_per_second"] / results[0]["nproc"]
    for result in results:
        result["scaling_efficiency"] = round(
            result["samples_per_second"] / (base * result["nproc"]), 3
        )
    report = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "config": student,
        "results": results,
    }
    if args.device.startswith("cuda"):
        import torch

        report["gpu"] = torch.cuda.get_device_name(0)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
