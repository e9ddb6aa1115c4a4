"""Network forward time under torch and under ONNX Runtime on the CPU, for the project's students.

    python bench/onnx_speed.py --out bench/results/onnx_speed_cpu.json

Cases (random weights: the speed does not depend on them):

- ``s1``: the 2-D student S1 of the KD evidence grid (bench/kd_evidence/s1.yaml: its network
  and slice size; 6 outputs, the cohort's 5 structures + background), on a batch of slices as
  large as the CPU predictor plans for a 224-slice CT;
- ``unet3d``: the 3-D UNet student of bench/inference_speed.py (8/16/32/64 channels, batch
  norm, 4 outputs), on the whole 267x267x224 volume the predictor runs for the synthetic
  512x512x224 CT at 1.5 mm, and on a half-size one (134x134x112), each padded to its size
  multiple.

The ONNX file is the cached export the onnxruntime backend uses
(:func:`mtkd.export.ort_backend.onnxruntime_model`, cache in ``--cache``). Threads as the
predictor sets them (:func:`mtkd.infer.memory.configure_cpu_threads`), or ``--threads``, the
same count for the onnxruntime session (a fresh one per input, so that its peak memory is
its own). Per input: one warm-up pass of each (peak memory measured there), then ``--repeats``
passes of each, interleaved; the median and the fastest are reported, with the largest logit
difference against the bound of the ONNX export's check.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from mtkd.data.labels import LabelTable
from mtkd.data.preprocess import Preprocessing
from mtkd.export.onnx import ONNX_RELATIVE_BOUND
from mtkd.export.ort_backend import OrtCpuNetwork, onnxruntime_model
from mtkd.export.verify import max_logit_difference
from mtkd.infer.inference import first_output
from mtkd.infer.memory import PeakMemory, configure_cpu_threads, round_up
from mtkd.infer.predictor import Predictor
from mtkd.modelfiles.model_io import LoadedModel, build_from_spec, export_model, load_model

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from inference_speed import HU_WINDOW, SPACING, STUDENT  # noqa: E402

S1_CONFIG = BENCH / "kd_evidence" / "s1.yaml"
S1_LABELS = LabelTable({1: "liver", 2: "spleen", 3: "kidney_left", 4: "kidney_right", 5: "aorta"})
STUDENT_LABELS = LabelTable({1: "body", 2: "lung", 3: "bone"})
TYPICAL_SLICES = 224
VOLUMES_3D = {"whole CT at 1.5 mm": (267, 267, 224), "half size": (134, 134, 112)}


def s1_model(folder: Path) -> LoadedModel:
    """The S1 student of the KD grid with random weights, as a model folder."""
    config = yaml.safe_load(S1_CONFIG.read_text(encoding="utf-8"))
    data = config["data"]
    spec = {
        "name": config["model"]["name"],
        "params": {"in_channels": 1, "out_channels": len(S1_LABELS) + 1, "spatial_dims": 2},
        "reconstruction": "none",
    }
    prep = Preprocessing(
        dims=2,
        hu_window=tuple(data["hu_window"]),
        spacing=None,
        crop_foreground=True,
        slice_size=tuple(data["slice_size"]),
        patch_size=(64, 64, 64),
        in_channels=1,
    )
    return _saved(spec, prep, S1_LABELS, folder / "s1")


def student_3d(folder: Path) -> LoadedModel:
    """bench/inference_speed.py's 3-D UNet student with random weights, as a model folder."""
    params = {"spatial_dims": 3, "in_channels": 1, "out_channels": 4, **STUDENT["params"]}
    spec = {"name": STUDENT["name"], "params": params, "reconstruction": "none"}
    prep = Preprocessing(
        dims=3,
        hu_window=HU_WINDOW,
        spacing=SPACING,
        crop_foreground=False,
        slice_size=(64, 64),
        patch_size=(64, 64, 64),
        in_channels=1,
    )
    return _saved(spec, prep, STUDENT_LABELS, folder / "unet3d")


def _saved(spec: dict, prep: Preprocessing, labels: LabelTable, folder: Path) -> LoadedModel:
    torch.manual_seed(0)
    export_model(
        build_from_spec(spec),
        folder,
        spec=spec,
        labels=labels,
        prep=prep,
        activation="softmax",
        lineage={"kind": "benchmark", "weights": "random"},
        name=folder.name,
    )
    return load_model(folder)


def inputs_for(model: LoadedModel) -> dict[str, torch.Tensor]:
    """{what: network input (B, C, *S)} as the CPU predictor gives them."""
    generator = torch.Generator().manual_seed(0)
    multiple = model.size_multiple
    if model.prep.dims == 2:
        size = tuple(int(s) for s in model.prep.slice_size)
        plan = Predictor(model, "cpu").plan((*size, TYPICAL_SLICES))
        shape = (plan.batch, 1, *(round_up(s, multiple) for s in size))
        return {f"{plan.batch} slices": torch.rand(shape, generator=generator)}
    return {
        what: torch.rand((1, 1, *(round_up(s, multiple) for s in size)), generator=generator)
        for what, size in VOLUMES_3D.items()
    }


def one_pass(network, x: torch.Tensor) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        first_output(network(x))
    return time.perf_counter() - started


def measure(model: LoadedModel, ort_model: LoadedModel, x: torch.Tensor, repeats: int) -> dict:
    """Peak memory of a warm-up pass and seconds of ``repeats`` passes, torch and ORT."""
    backends = {"torch": model.network, "onnxruntime": ort_model.network}
    row: dict = {"input": list(x.shape)}
    for name, network in backends.items():
        with PeakMemory("cpu") as peak:
            one_pass(network, x)
        row[f"{name}_peak_bytes"] = peak.peak_bytes
    runs: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(repeats):
        for name, network in backends.items():
            runs[name].append(one_pass(network, x))
    for name in backends:
        row[f"{name}_s"] = statistics.median(runs[name])
        row[f"{name}_min_s"] = min(runs[name])
        row[f"{name}_runs_s"] = runs[name]
    row["speedup"] = row["torch_s"] / row["onnxruntime_s"]
    with torch.inference_mode():
        difference, scale = max_logit_difference(model.network, ort_model.network, x)
    row["max_abs_diff"] = difference
    row["bound"] = ONNX_RELATIVE_BOUND * (1.0 + scale)
    return row


def machine() -> str:
    cpu = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return cpu


def run(args: argparse.Namespace) -> dict:
    if args.threads:  # as a user's OMP_NUM_THREADS: the predictor and the backend keep it
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    threads = configure_cpu_threads()
    work = Path(args.work or tempfile.mkdtemp(prefix="onnx-speed-"))
    cache = Path(args.cache) if args.cache else work / "cache"
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "threads": threads,
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "repeats": args.repeats,
        "note": args.note,
        "results": [],
    }
    for case, build in (("s1", s1_model), ("unet3d", student_3d)):
        if args.cases and case not in args.cases:
            continue
        model = build(work)
        started = time.perf_counter()
        ort_model, record = onnxruntime_model(model, cache)
        prepared = time.perf_counter() - started
        print(f"{case}: onnxruntime ready in {prepared:.1f} s ({record['check']})", flush=True)
        for what, x in inputs_for(model).items():
            # a fresh session per input: its peak memory is not hidden by an arena grown before
            fresh = dataclasses.replace(ort_model, network=OrtCpuNetwork(record["path"], threads))
            row = {"case": case, "what": what, **measure(model, fresh, x, args.repeats)}
            row["parameters"] = sum(p.numel() for p in model.network.parameters())
            row["export_and_check_s"] = prepared
            row["exported_now"] = record["exported"]
            report["results"].append(row)
            print(line(row), flush=True)
            if args.out:
                save(report, Path(args.out))
    return report


def line(row: dict) -> str:
    shape = "x".join(str(s) for s in row["input"])
    return (
        f"| {row['case']} | {row['what']} | {shape} | {row['torch_s']:.3f} | "
        f"{row['onnxruntime_s']:.3f} | {row['speedup']:.2f}x | {row['torch_min_s']:.3f} | "
        f"{row['onnxruntime_min_s']:.3f} | {row['torch_peak_bytes'] / 2**20:,.0f} | "
        f"{row['onnxruntime_peak_bytes'] / 2**20:,.0f} | {row['max_abs_diff']:.1e} "
        f"(<= {row['bound']:.1e}) |"
    )


HEADER = (
    "| case | input | B x C x S | torch s | ORT s | torch / ORT | torch min s | ORT min s "
    "| torch peak MiB | ORT peak MiB | max logit diff |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def markdown(report: dict) -> str:
    lines = [
        f"{report['machine']}, {report['threads']} threads, torch {report['torch']}, "
        f"onnxruntime {report['onnxruntime']}, {report['date']}, median of {report['repeats']}"
        + (f"; {report['note']}" if report["note"] else ""),
        "",
        HEADER,
    ]
    return "\n".join(lines + [line(row) for row in report["results"]])


def save(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(markdown(report) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON file to write (and a .md table beside it)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", nargs="*", choices=["s1", "unet3d"])
    parser.add_argument("--work", help="folder for the model folders (default: a temporary one)")
    parser.add_argument("--cache", help="onnxruntime cache folder (default: WORK/cache)")
    parser.add_argument("--note", default="", help="a remark stored with the numbers")
    parser.add_argument(
        "--threads", type=int, help="threads for both (default: as the predictor sets them)"
    )
    args = parser.parse_args()
    report = run(args)
    print(markdown(report))


if __name__ == "__main__":
    main()
