"""The ``mtkd`` command: one subcommand per job, each a thin call into the engine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mtkd import __version__
from mtkd.errors import MTKDError
from mtkd.infer.output_paths import SEGMENT_FORMATS
from mtkd.progress import ProgressReporter


def _run_training(args: argparse.Namespace, kind: str) -> int:
    from mtkd.config import load_config
    from mtkd.engine.distributed import Distributed
    from mtkd.engine.trainer import Trainer, TrainingInterrupted, resume_run

    reports = Distributed.from_environment().is_main  # under torchrun, rank 0 reports
    try:
        if args.resume:
            result = resume_run(args.resume)
        else:
            if args.config is None:
                raise MTKDError(f"`mtkd {kind}` needs a CONFIG file (or --resume RUN_DIR)")
            config = load_config(args.config)
            if config.kind != kind:
                raise MTKDError(
                    f"this config is for `mtkd {config.kind}`, not `mtkd {kind}`", args.config
                )
            if args.device:
                config.train.device = args.device
            run_dir = Path(args.run_dir or Path("runs") / config.name)
            result = Trainer(config, run_dir).run()
    except TrainingInterrupted as stop:
        if reports:
            print(f"mtkd: {stop}", file=sys.stderr)
        return 130
    if not reports:
        return 0
    best = (
        "n/a" if not result.best_epoch else f"{result.best_metric:.4f} (epoch {result.best_epoch})"
    )
    print(f"finished: {result.run_dir}  best validation Dice {best}  model {result.model_dir}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    return _run_training(args, "train")


def cmd_distill(args: argparse.Namespace) -> int:
    return _run_training(args, "distill")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mtkd.data.datasets import load_dataset
    from mtkd.data.splits import read_split
    from mtkd.devices import resolve_device
    from mtkd.infer.evaluate import (
        check_scores_csv,
        evaluate,
        summarise,
        summary_table,
        write_scores_csv,
    )
    from mtkd.infer.predictor import Predictor
    from mtkd.modelfiles.model_io import load_model

    inputs = [path for path in (args.split, args.labels_json) if path]
    if args.csv:  # cheap checks first: the model and the data take a while to load
        check_scores_csv(args.csv, inputs)
    split = read_split(args.split, require=[args.subset]) if args.split else None
    device = resolve_device(args.device)
    model = load_model(args.model, device)
    dataset = load_dataset(args.data, labels_json=args.labels_json)
    case_ids = [case.case_id for case in dataset.cases]
    if split is not None:
        case_ids = getattr(split, args.subset)
        if not case_ids:
            raise MTKDError(f"the split's '{args.subset}' list is empty", path=args.split)
    inputs += [case.image for case in dataset.cases] + [c.label for c in dataset.cases if c.label]
    output = Path(args.csv or Path(model.folder).parent / "report" / "evaluation.csv")
    check_scores_csv(output, inputs)
    scores = evaluate(Predictor(model, device), dataset, case_ids)
    write_scores_csv(scores, output)
    print(f"{model.name}: {len(case_ids)} case(s), per-volume scores in {output}")
    print(summary_table(summarise(scores)))
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from mtkd.data.ct_check import ct_intensity_warning
    from mtkd.data.image_io import check_writable, expand_image_inputs, read_image
    from mtkd.data.segnrrd import write_segmentation
    from mtkd.devices import resolve_device
    from mtkd.infer.output_paths import segment_outputs
    from mtkd.infer.predictor import Predictor
    from mtkd.modelfiles.sources import load_any_model

    progress = ProgressReporter(args.progress)
    device = resolve_device(args.device)
    images = expand_image_inputs(args.images)
    planned = segment_outputs(images, args.output, args.format, model=args.model)
    outputs = [check_writable(output) for output in planned]  # before anything is loaded
    progress(0.0, "loading the model")
    predictor = Predictor(load_any_model(args.model, device), device)  # loaded once
    share = 0.9 / len(images)
    for index, (image_path, output) in enumerate(zip(images, outputs, strict=True)):
        start = 0.1 + index * share
        progress(start, f"reading {image_path.name}")
        image = read_image(image_path, keep_integer=True)
        warning = ct_intensity_warning(image, image_path)
        if warning:
            print(f"mtkd: warning: {warning}", file=sys.stderr)
        progress(start + 0.1 * share, f"segmenting {image_path.name}")
        try:
            prediction = predictor.predict(image)
        except MTKDError as error:  # a problem of this image (e.g. its size at the model's
            if error.path is not None:  # spacing) is reported with its file
                raise
            raise MTKDError(error.problem, image_path) from None
        progress(start + 0.9 * share, f"writing {output.name}")
        write_segmentation(prediction.labelmap, predictor.model.labels, output)
        print(f"{image_path} -> {output} ({prediction.seconds:.2f} s, {prediction.plan})")
    progress(1.0, "done")
    return 0


def _segmenter(path: str, labels_json: str | None, device):
    """A model (any source) or a stored segmentation of another tool, for ``compare``."""
    from mtkd.data.labels import LabelTable
    from mtkd.infer.compare import ModelSegmenter, StoredSegmentation
    from mtkd.infer.predictor import Predictor
    from mtkd.modelfiles.sources import is_stored_output, load_any_model

    if is_stored_output(path):
        labels = LabelTable.from_json(labels_json) if labels_json else None
        return StoredSegmentation(path, labels)
    return ModelSegmenter(Predictor(load_any_model(path, device), device))


def cmd_compare(args: argparse.Namespace) -> int:
    from mtkd.data.atomic import removed_if_left_empty
    from mtkd.data.ct_check import ct_intensity_warning
    from mtkd.data.image_io import check_writable, read_image, read_label
    from mtkd.data.labels import LabelTable
    from mtkd.data.segnrrd import write_segmentation
    from mtkd.devices import resolve_device
    from mtkd.infer.compare import compare, comparison_paths, format_comparison, write_comparison
    from mtkd.infer.output_paths import check_compare_outputs, compare_inputs

    progress = ProgressReporter(args.progress)
    device = resolve_device(args.device)
    output = Path(args.output)
    paths = comparison_paths(output, png=args.png, segmentations=args.save_segmentations)
    others = (args.reference, args.teacher_labels, args.student_labels, args.reference_labels)
    inputs = compare_inputs(args.image, args.teacher, args.student, others)
    check_compare_outputs(output, paths.values(), *inputs)
    for path in paths.values():  # before anything is loaded
        check_writable(path)
    progress(0.0, "reading the image")
    image = read_image(args.image)
    warning = ct_intensity_warning(image, args.image)
    if warning:
        print(f"mtkd: warning: {warning}", file=sys.stderr)
    progress(0.05, "loading the teacher")
    teacher = _segmenter(args.teacher, args.teacher_labels, device)
    progress(0.15, "loading the student")
    student = _segmenter(args.student, args.student_labels, device)
    reference = read_label(args.reference, reference=image) if args.reference else None
    reference_labels = None
    if args.reference_labels:
        reference_labels = LabelTable.from_json(args.reference_labels)
    progress(0.25, "segmenting with both models and scoring")
    result = compare(
        teacher, student, image, reference, reference_labels, reference_path=args.reference
    )
    print(format_comparison(result))
    progress(0.9, "writing the comparison")
    with removed_if_left_empty(output):
        paths.update(write_comparison(result, output, image, png=args.png))
        if args.save_segmentations:
            write_segmentation(result.teacher_labelmap, result.labels, paths["teacher"])
            write_segmentation(result.student_labelmap, result.labels, paths["student"])
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    progress(1.0, "done")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from mtkd.export.formats import export_model_as

    record = export_model_as(args.model, args.format, args.output, sample=args.sample)
    print(
        f"{args.format}: {record['path']} (max |logit difference| on the CT sample "
        f"{record['max_abs_diff']:.2e}, allowed {record['bound']:.2e}; {record['seconds']:.1f} s)"
    )
    return 0


def cmd_taps(args: argparse.Namespace) -> int:
    import torch

    from mtkd.models import build_teacher, network_info
    from mtkd.models.taps import list_taps

    info = network_info(args.model)
    dims = len(args.input_size)
    params = {
        "in_channels": args.in_channels,
        "out_channels": args.out_channels,
        "spatial_dims": dims,
    }
    network = build_teacher(args.model, reconstruction=args.reconstruction, **params)
    example = torch.zeros(1, args.in_channels, *args.input_size)
    prefix = "backbone." if args.reconstruction != "none" else ""
    marks = {prefix + info.bottleneck_tap: "B", prefix + info.decoder_tap: "D"}
    marks.update({prefix + name: f"E{i}" for i, name in enumerate(info.encoder_taps, start=1)})
    print(f"{args.model}: input {tuple(example.shape)}; E/B/D mark the registry's scale taps")
    for name, shape in list_taps(network, example):
        print(f"{marks.get(name, ''):>3}  {name:<48} {tuple(shape)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mtkd.demo import run_demo

    run_demo(Path(args.output), ct=args.ct, labels=args.labels, quick=args.quick)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from mtkd.data.cohort import write_cohort

    path = write_cohort(
        args.output,
        args.subjects,
        seed=args.seed,
        size=args.size,
        spacing=args.spacing,
        style=args.style,
        difficulty=args.difficulty,
    )
    print(f"wrote {args.subjects} SYNTHETIC phantom(s), not patient data, to {path.parent}")
    return 0


def cmd_protocol(args: argparse.Namespace) -> int:
    from mtkd.engine.trainer import TrainingInterrupted
    from mtkd.protocols import available_protocols, load_protocol, run_protocol, write_configs

    if args.name is None:
        print("protocols: " + ", ".join(available_protocols()))
        return 0
    runs = args.runs
    if runs is None and not args.write_configs:
        runs = str(Path("runs") / Path(args.name).stem)
    protocol = load_protocol(
        args.name,
        data=args.data,
        runs=runs,
        overrides=args.set or [],
        epochs=args.epochs,
        slice_size=args.slice_size,
        patch_size=args.patch_size,
        device=args.device,
    )
    if args.write_configs:
        for path in write_configs(protocol, args.write_configs):
            print(f"wrote {path}")
        return 0
    try:
        run_protocol(protocol, runs, args.stage, device=args.device or "auto")
    except TrainingInterrupted as stop:
        print(f"mtkd: {stop}; run the same command again to continue", file=sys.stderr)
        return 130
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from mtkd.ablation.run import load_ablation, run_ablation
    from mtkd.engine.trainer import TrainingInterrupted

    ablation = load_ablation(
        args.config,
        seeds=args.seeds,
        device=args.device,
        data_source=args.data,
        teacher=args.teacher,
    )
    output = Path(args.output or Path("runs") / f"ablation-{ablation.name}")
    runs = len(ablation.cells) * len(ablation.splits) * len(ablation.seeds)
    splits = f" x {len(ablation.splits)} split seed(s)" if ablation.split_seeds else ""
    print(
        f"ablation {ablation.name}: {len(ablation.cells)} cell(s){splits} x "
        f"{len(ablation.seeds)} seed(s) = {runs} run(s)"
        f"{' + the teacher' if ablation.teacher_row else ''} in {output}"
    )
    try:
        result = run_ablation(
            ablation, output, tensorboard=args.tensorboard, jobs=args.jobs, cells=args.cells
        )
    except TrainingInterrupted as stop:
        print(f"mtkd: {stop}", file=sys.stderr)
        return 130
    print()
    print(result.table)
    print()
    for kind, path in result.files.items():
        print(f"{kind}: {path}")
    if args.tensorboard:
        print(f"tensorboard: tensorboard --logdir {output / 'tensorboard'}")
    return 0


PROGRESS_HELP = "print machine-readable MTKD-PROGRESS lines (for the Slicer modules)"
MODEL_HELP = (
    "run or model folder, exported TorchScript/ONNX folder, training checkpoint, MONAI bundle "
    "(folder or .zip) or TorchScript file"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtkd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mtkd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    for name, function, text in (
        ("train", cmd_train, "train a teacher (multi-task) or a plain network"),
        ("distill", cmd_distill, "distil a student from a trained teacher"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("config", nargs="?", help="run configuration (YAML)")
        sub.add_argument("--run-dir", help="run folder (default runs/<name>)")
        sub.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run")
        sub.add_argument("--device", help="override train.device (auto, cpu, cuda, cuda:N, mps)")
        sub.set_defaults(func=function)

    sub = commands.add_parser(
        "evaluate", help="per-volume Dice and HD95 of a model on labelled data"
    )
    sub.add_argument("model", help="model folder or run folder")
    sub.add_argument("data", help="dataset (MSD folder, images/ + labels/ folders)")
    sub.add_argument("--split", help="a run's split.json: evaluate one of its subsets")
    sub.add_argument("--subset", default="test", choices=["train", "val", "test", "student_train"])
    sub.add_argument("--labels-json", help="label names when the dataset has none")
    sub.add_argument("--csv", help="where to write per-volume scores (CSV)")
    sub.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    sub.set_defaults(func=cmd_evaluate)

    sub = commands.add_parser("segment", help="segment CT images with a model")
    sub.add_argument("model", help=MODEL_HELP)
    sub.add_argument(
        "images", nargs="+", help="NIfTI/NRRD/MHA files, folders of them, DICOM series folders"
    )
    sub.add_argument(
        "-o", "--output", required=True, help=".seg.nrrd/.nii.gz/.nii/.nrrd/.mha, or a folder/"
    )
    sub.add_argument(
        "--format",
        choices=SEGMENT_FORMATS,
        help="file type when -o is a folder (default seg.nrrd); with a file, its ending's",
    )
    sub.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    sub.add_argument("--progress", action="store_true", help=PROGRESS_HELP)
    sub.set_defaults(func=cmd_segment)

    sub = commands.add_parser(
        "compare", help="teacher versus student on one CT: agreement, speed, memory, size"
    )
    sub.add_argument("image", help="CT image file or DICOM series folder")
    sub.add_argument("--teacher", required=True, help=MODEL_HELP + ", or a stored label map")
    sub.add_argument("--student", required=True, help=MODEL_HELP)
    sub.add_argument("--reference", help="reference label map on the CT's grid")
    sub.add_argument("--reference-labels", help="its label names (JSON); default: the student's")
    sub.add_argument("--teacher-labels", help="label names (JSON) of a stored teacher label map")
    sub.add_argument("--student-labels", help="label names (JSON) of a stored student label map")
    sub.add_argument("-o", "--output", default="comparison", help="output folder")
    sub.add_argument("--png", action="store_true", help="also draw both models' contours")
    sub.add_argument(
        "--save-segmentations",
        action="store_true",
        help="also write teacher.seg.nrrd and student.seg.nrrd (on the CT's grid)",
    )
    sub.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    sub.add_argument("--progress", action="store_true", help=PROGRESS_HELP)
    sub.set_defaults(func=cmd_compare)

    sub = commands.add_parser("export", help="export a model, checked numerically on a CT")
    sub.add_argument("model", help=MODEL_HELP)
    sub.add_argument("--format", required=True, choices=["torchscript", "onnx", "bundle"])
    sub.add_argument("-o", "--output", required=True, help="output folder")
    sub.add_argument(
        "--sample", help="CT used for the numerical check (default: a test case of the run)"
    )
    sub.set_defaults(func=cmd_export)

    sub = commands.add_parser("taps", help="list a network's tap names and output shapes")
    sub.add_argument("model", help="registered network name (an unknown name lists them all)")
    sub.add_argument("--input-size", type=int, nargs="+", default=[128, 128], help="2 or 3 sizes")
    sub.add_argument("--in-channels", type=int, default=1)
    sub.add_argument("--out-channels", type=int, default=2)
    sub.add_argument("--reconstruction", default="none", choices=["none", "masked", "unmasked"])
    sub.set_defaults(func=cmd_taps)

    sub = commands.add_parser(
        "demo", help="teacher -> distilled student -> segmentation on the bundled CT"
    )
    sub.add_argument("--output", default="runs/demo", help="folder for the demo's runs")
    sub.add_argument("--ct", help="CT image (default: the bundled abdomen sample)")
    sub.add_argument("--labels", help="its label map, TotalSegmentator ids (default: bundled)")
    sub.add_argument("--quick", action="store_true", help="a few epochs only (smoke test)")
    sub.set_defaults(func=cmd_demo)

    sub = commands.add_parser(
        "synth", help="write a cohort of synthetic abdominal CT phantoms (MSD layout)"
    )
    sub.add_argument("output", help="folder for dataset.json, imagesTr/ and labelsTr/")
    sub.add_argument("--subjects", type=int, default=20, help="number of phantoms (default 20)")
    sub.add_argument("--seed", type=int, default=0, help="same seed, identical cohort")
    sub.add_argument(
        "--size", type=int, nargs=3, default=[96, 96, 48], metavar=("X", "Y", "Z"), help="voxels"
    )
    sub.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=[3.0, 3.0, 3.0],
        metavar=("SX", "SY", "SZ"),
        help="voxel size in mm (--style ct: nominal, varied per subject)",
    )
    sub.add_argument(
        "--style",
        choices=["ellipsoid", "ct"],
        default="ellipsoid",
        help="ellipsoid (default): deformed ellipsoids; ct: harder, CT-like (touching "
        "unlabelled neighbours, contrast phases, lesions, vessels, per-subject scanner settings)",
    )
    sub.add_argument(
        "--difficulty",
        type=float,
        default=None,
        help="--style ct only, 0..1 (default 0.5): closer HU at organ borders, more noise and "
        "lesions",
    )
    sub.set_defaults(func=cmd_synth)

    sub = commands.add_parser(
        "protocol",
        help="run a whole experiment preset: teacher, students, no-KD twins, test report",
        description="Run a protocol (mtkd/presets/NAME.yaml or a protocol file): each stage "
        "in order, skipping finished ones and resuming stopped ones, then evaluate every "
        "model on the test patients (RUNS/report.md, RUNS/report.json). Without NAME: list "
        "the shipped protocols.",
    )
    sub.add_argument("name", nargs="?", help="thesis-2d-spleen, 3d-multiorgan, or a file")
    sub.add_argument("--data", help="the dataset folder (fills ${DATA})")
    sub.add_argument("--runs", help="folder for the stages' runs (default runs/NAME)")
    sub.add_argument(
        "--stage",
        action="append",
        help="all (default), teacher, students, or a stage name; repeatable",
    )
    sub.add_argument("--device", help="override train.device and evaluate there")
    sub.add_argument("--epochs", type=int, help="override train.epochs of every stage")
    sub.add_argument("--slice-size", type=int, nargs=2, metavar=("X", "Y"))
    sub.add_argument("--patch-size", type=int, nargs=3, metavar=("X", "Y", "Z"))
    sub.add_argument(
        "--set",
        action="append",
        metavar="[STAGE:]KEY=VALUE",
        help="override a config key (YAML value) in every stage, one stage (and its no-KD "
        "twin) or 'students:'; repeatable, e.g. teacher:model.params.init_filters=4",
    )
    sub.add_argument(
        "--write-configs",
        metavar="DIR",
        help="write the filled stage configs and a protocol.yaml to DIR instead of running",
    )
    sub.set_defaults(func=cmd_protocol)

    sub = commands.add_parser(
        "ablate",
        help="a grid of KD variants (pairs x feature loss x output loss), no KD and the "
        "teacher, over seeds: CSV, Markdown table and plots",
        description="Train and score every cell of an ablation grid (a distill config with an "
        "'ablation:' section) with the same data, split, recipe and epochs; write "
        "results.csv, runs.csv (per test case), summary.csv, summary.md, summary.json and "
        "evidence.md (paired differences against no KD, the cell chosen on validation) and "
        "plots/ to the output folder. Run it again to continue an interrupted grid.",
    )
    sub.add_argument("config", help="ablation configuration (YAML)")
    sub.add_argument("-o", "--output", help="output folder (default runs/ablation-<name>)")
    sub.add_argument("--seeds", type=int, nargs="+", help="replace ablation.seeds")
    sub.add_argument("--data", help="replace data.source (the dataset folder)")
    sub.add_argument(
        "--teacher", help="replace distill.teacher ({split_seed}: one teacher per split seed)"
    )
    sub.add_argument(
        "--tensorboard",
        action="store_true",
        help="mirror each run's events to OUTPUT/tensorboard (needs the tensorboard package)",
    )
    sub.add_argument("--device", help="override train.device (auto, cpu, cuda, cuda:N, mps)")
    sub.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="train this many runs at once, each in its own process (default 1; on the CPU "
        "each gets an equal share of the cores); the results are the same",
    )
    sub.add_argument(
        "--cells",
        nargs="+",
        metavar="CELL",
        help="run and report only these cells (a swept method's name: all its sub-cells); "
        "the others are left for a later call, and the reports name them",
    )
    sub.set_defaults(func=cmd_ablate)

    sub = commands.add_parser(
        "library", help="list, import and delete the models of the model library"
    )
    library = sub.add_subparsers(dest="library_command", required=True)
    root_help = "library folder (default: $MTKD_LIBRARY, else ~/.mtkd/models)"
    item = library.add_parser("list", help="list the library's models")
    item.add_argument("--root", help=root_help)
    item.set_defaults(func=cmd_library_list)
    item = library.add_parser("import", help="copy a model into the library, checked")
    item.add_argument(
        "source",
        help="run or model folder, exported TorchScript/ONNX folder, MONAI bundle folder, "
        "or a .zip of one",
    )
    item.add_argument("--name", help="display name (default: the model's own name)")
    item.add_argument("--root", help=root_help)
    item.set_defaults(func=cmd_library_import)
    item = library.add_parser("delete", help="remove a model from the library")
    item.add_argument("key", help="the model's key (first column of `mtkd library list`)")
    item.add_argument("--root", help=root_help)
    item.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    item.set_defaults(func=cmd_library_delete)

    sub = commands.add_parser(
        "config",
        help="every configuration key with its default (commented YAML), or where a "
        "protocol preset departs from the defaults",
    )
    sub.add_argument(
        "--preset", metavar="PROTOCOL", help="table a protocol's changes to the defaults"
    )
    sub.set_defaults(func=cmd_config)

    sub = commands.add_parser(
        "env", help="Python, package, CUDA, GPU, CPU and memory report (for bug reports)"
    )
    sub.add_argument("--json", action="store_true", help="machine-readable JSON")
    sub.set_defaults(func=cmd_env)
    return parser


def _library(args: argparse.Namespace):
    from mtkd.library import ModelLibrary, default_library_root

    return ModelLibrary(args.root or default_library_root())


def _size_text(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB" if size >= 1 << 20 else f"{size / 1024:.0f} KiB"


def cmd_library_list(args: argparse.Namespace) -> int:
    library = _library(args)
    library.check_root()
    entries = library.entries()
    others = library.other_folders()
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        print(
            f"mtkd: note: not library entries (no valid library_entry.json), left alone: "
            f"{len(others)} folder(s) in {library.root}: {shown}",
            file=sys.stderr,
        )
    if not entries:
        missing = "" if library.root.is_dir() else " (the folder does not exist yet)"
        print(f"no models in {library.root}{missing}")
        return 0
    print(f"{len(entries)} model(s) in {library.root}")
    for entry in entries:
        if entry.problem:
            print(f"{entry.key:<24} PROBLEM: {entry.problem}")
            continue
        dice = "n/a" if entry.validation_dice is None else f"{entry.validation_dice:.3f}"
        print(
            f"{entry.key:<24} {entry.name}  [{entry.format}]  {_size_text(entry.size_bytes)}  "
            f"val Dice {dice}  labels: {', '.join(entry.labels)}"
        )
        if entry.teacher:
            print(f"{'':<24} teacher: {entry.teacher}")
    return 0


def cmd_library_import(args: argparse.Namespace) -> int:
    library = _library(args)
    entry = library.import_model(args.source, name=args.name)
    print(
        f"imported {entry.key}: {entry.name} [{entry.format}], {len(entry.labels)} label(s), "
        f"{_size_text(entry.size_bytes)} -> {entry.path}"
    )
    return 0


def cmd_library_delete(args: argparse.Namespace) -> int:
    library = _library(args)
    entry = library.get(args.key)
    if not args.yes:
        try:
            answer = input(f"delete {entry.key} ({entry.name}) at {entry.path}? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("not deleted")
            return 1
    library.delete(entry.key)
    print(f"deleted {entry.key}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from mtkd.config_reference import annotated_defaults, preset_differences

    print(preset_differences(args.preset) if args.preset else annotated_defaults(), end="")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    import json

    from mtkd.environment import environment_report, format_environment

    report = environment_report()
    print(json.dumps(report, indent=2) if args.json else format_environment(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MTKDError as error:
        print(f"mtkd: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mtkd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
