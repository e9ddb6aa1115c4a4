"""Apply latency in MTKD Segment: the engine worker (``mtkd serve``) against a new process for
every Apply, on the bundled abdomen CT in a slicer-core scene.

    python bench/worker_latency.py --out bench/results/worker_latency_cpu.json
    python bench/worker_latency.py --model /path/to/student_kd --device cpu --repeats 5

Each time runs from the request (``SegmentLogic.start``, as the Apply button calls it) to the
segmentation node loaded into the scene (the task polled every ``--poll`` seconds; the panel's
timer polls every 0.25 s, which adds up to that much on screen):

- ``first``: the first Apply on a new worker: the worker starts (Python, torch, MONAI), loads
  the model and segments;
- ``warm``: the next Applies on the same worker (the model kept in memory), ``--settle``
  seconds after the first (MTKD Segment asks for ``--backend auto``: meanwhile the worker
  compares torch and ONNX Runtime on the model in the background and keeps the faster);
- ``process``: today's one-process path: ``python -m mtkd segment`` started for the Apply.

The process path runs first (it also warms the disk cache for the imports of both), then the
worker. Without ``--model``, the student is the demo's (``mtkd demo``: thesis S1, 2-D slices of
64x64, five abdominal structures) with untrained weights: the time does not depend on them.
The targets of issue #19: ``warm`` at most 1 s on a 2-core CPU, ``first`` about ``process``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "Testing")]

from slicer_scene import load_volume, new_scene  # noqa: E402 - Testing/, a headless scene

from MTKDLib.segment_logic import SegmentLogic  # noqa: E402
from MTKDLib.worker import EngineWorker  # noqa: E402

CT = ROOT / "Testing" / "Data" / "abdomen_ct.nii.gz"
WARM_TARGET_SECONDS = 1.0
STUDENT_SPEC = {
    "name": "thesis_s1",
    "params": {"in_channels": 1, "out_channels": 6, "spatial_dims": 2},
    "reconstruction": "none",
}
STUDENT_LABELS = {1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left", 5: "stomach"}


def demo_student(folder: Path) -> Path:
    """The demo's student network with untrained weights, exported as a model folder."""
    from mtkd.data.labels import LabelTable
    from mtkd.data.preprocess import Preprocessing
    from mtkd.modelfiles.model_io import build_from_spec, export_model

    prep = Preprocessing(
        dims=2,
        hu_window=(-160.0, 240.0),
        spacing=None,
        crop_foreground=True,
        slice_size=(64, 64),
        patch_size=(64, 64, 64),
        in_channels=1,
    )
    export_model(
        build_from_spec(STUDENT_SPEC),
        folder,
        spec=STUDENT_SPEC,
        labels=LabelTable(STUDENT_LABELS),
        prep=prep,
        activation="softmax",
        lineage={"kind": "benchmark (untrained)"},
        name="demo student (untrained)",
    )
    return folder


def timed_apply(logic: SegmentLogic, volume, model: Path, device: str, poll: float) -> dict:
    """One Apply: seconds from the request to the node in the scene, and the job's reply."""
    started = time.perf_counter()
    task = logic.start(volume, model, device)
    while not task.poll().finished:
        time.sleep(poll)
    seconds = time.perf_counter() - started
    if not task.state.succeeded:
        raise RuntimeError(f"the Apply failed: {task.state.error}")
    logic.scene.RemoveNode(task.result)
    reply = getattr(task.process, "reply", {})
    return {
        "seconds": round(seconds, 3),
        "job_seconds": reply.get("seconds"),
        "models_loaded": reply.get("models_loaded"),
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="mtkd-worker-bench-") as work:
        model = Path(args.model) if args.model else demo_student(Path(work) / "student")
        return measure(args, model)


def measure(args: argparse.Namespace, model: Path) -> dict:
    """The three kinds of Apply with ``model``, and what they ran on."""
    scene, _ = new_scene()
    volume = load_volume(scene, args.ct, "CT")
    load_before = os.getloadavg()

    process_logic = SegmentLogic(scene, python=sys.executable)
    process = [timed_apply(process_logic, volume, model, args.device, args.poll)
               for _ in range(args.repeats)]  # fmt: skip

    worker = EngineWorker(python=sys.executable)
    try:
        worker_logic = SegmentLogic(scene, worker=worker)
        first = timed_apply(worker_logic, volume, model, args.device, args.poll)
        time.sleep(args.settle)  # the user looks at the result; the worker compares backends
        warm = [timed_apply(worker_logic, volume, model, args.device, args.poll)
                for _ in range(args.repeats)]  # fmt: skip
        starts = worker.starts
    finally:
        worker.stop()

    image = volume.GetImageData().GetDimensions()
    warm_median = statistics.median(run["seconds"] for run in warm)
    process_median = statistics.median(run["seconds"] for run in process)
    return {
        "machine": f"{cpu_name()}, {os.cpu_count()} logical CPUs, {platform.system()}",
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "device": args.device,
        "settle_s": args.settle,
        "model": str(model) if args.model else "demo student (thesis_s1 2-D), untrained",
        "ct": f"{Path(args.ct).name} {image[0]}x{image[1]}x{image[2]}",
        "poll_seconds": args.poll,
        "first": first,
        "warm": warm,
        "process": process,
        "warm_median_s": warm_median,
        "process_median_s": process_median,
        "first_over_process": round(first["seconds"] / process_median, 2),
        "warm_within_target": warm_median <= WARM_TARGET_SECONDS,
        "worker_starts": starts,
    }


def table(report: dict) -> str:
    def row(name: str, runs: list[dict]) -> str:
        seconds = [run["seconds"] for run in runs]
        jobs = [run["job_seconds"] for run in runs if run["job_seconds"] is not None]
        job, outside = "-", "-"
        if jobs:
            job = f"{statistics.median(jobs):.2f}"
            rest = [run["seconds"] - run["job_seconds"] for run in runs]
            outside = f"{statistics.median(rest):.2f}"
        each = ", ".join(f"{s:.2f}" for s in seconds)
        return f"| {name} | {statistics.median(seconds):.2f} | {job} | {outside} | {each} |"

    lines = [
        f"{report['machine']}; load average {report['load_average_before_after']} "
        f"(before, after); device {report['device']}",
        f"model: {report['model']}; CT: {report['ct']}; polled every {report['poll_seconds']} s",
        "",
        "| Apply | median s (request -> node in scene) | the job in the worker | the rest "
        "(start, volume written, node loaded) | each |",
        "|---|---|---|---|---|",
        row("first on a new worker (start + segment)", [report["first"]]),
        row("warm worker (model kept)", report["warm"]),
        row("new process per Apply (before)", report["process"]),
        "",
        f"warm median {report['warm_median_s']:.2f} s (target <= {WARM_TARGET_SECONDS:.0f} s: "
        f"{'met' if report['warm_within_target'] else 'not met'}); first Apply "
        f"{report['first_over_process']:.2f}x the one-process Apply",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="student model folder (default: the demo's, untrained)")
    parser.add_argument("--ct", default=str(CT), help="CT file (default: the bundled one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="warm and one-process Applies")
    parser.add_argument(
        "--settle",
        type=float,
        default=30.0,
        help="seconds between the first Apply and the warm ones (the worker compares torch "
        "and ONNX Runtime in the background meanwhile; 0: the warm Applies may run before)",
    )
    parser.add_argument("--poll", type=float, default=0.01, help="seconds between polls")
    parser.add_argument("--out", help="write the report here (JSON)")
    args = parser.parse_args()
    report = run(args)
    print(table(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
