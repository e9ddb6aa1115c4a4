"""``mtkd evaluate``, ``segment``, ``compare`` and ``export``: a trained model put to use."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mtkd.cli.options import (
    DEVICE_HELP,
    MODEL_HELP,
    PROGRESS_HELP,
    add_backend_option,
    add_memory_option,
    add_postprocessing_options,
    memory_budget_bytes,
    model_on_backend,
    postprocessing_from_args,
)
from mtkd.errors import MTKDError
from mtkd.infer.output_paths import SEGMENT_FORMATS
from mtkd.progress import ProgressReporter

if TYPE_CHECKING:  # `segment` and `compare` open models with load_any_model unless given a
    from mtkd.modelfiles.cache import ModelLoader  # loader (`mtkd serve`: its model cache)


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Add ``evaluate``, ``segment``, ``compare`` and ``export`` to the ``mtkd`` subcommands."""
    _add_evaluate_parser(commands)
    _add_segment_parser(commands)
    _add_compare_parser(commands)
    _add_export_parser(commands)


def _add_evaluate_parser(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser(
        "evaluate", help="per-volume Dice and HD95 of a model on labelled data"
    )
    sub.add_argument("model", help=MODEL_HELP)
    sub.add_argument("data", help="dataset (MSD folder, images/ + labels/ folders)")
    sub.add_argument("--split", help="a run's split.json: evaluate one of its subsets")
    sub.add_argument("--subset", default="test", choices=["train", "val", "test", "student_train"])
    sub.add_argument("--labels-json", help="label names when the dataset has none")
    sub.add_argument("--csv", help="where to write per-volume scores (CSV)")
    sub.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_backend_option(sub)
    add_postprocessing_options(sub)
    sub.set_defaults(func=cmd_evaluate)


def _add_segment_parser(commands: argparse._SubParsersAction) -> None:
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
    sub.add_argument("--device", default="auto", help=DEVICE_HELP)
    sub.add_argument("--progress", action="store_true", help=PROGRESS_HELP)
    add_backend_option(sub)
    add_memory_option(sub)
    add_postprocessing_options(sub)
    sub.set_defaults(func=cmd_segment)


def _add_compare_parser(commands: argparse._SubParsersAction) -> None:
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
    sub.add_argument("--device", default="auto", help=DEVICE_HELP)
    sub.add_argument("--progress", action="store_true", help=PROGRESS_HELP)
    add_backend_option(sub)
    sub.set_defaults(func=cmd_compare)


def _add_export_parser(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser("export", help="export a model, checked numerically on a CT")
    sub.add_argument("model", help=MODEL_HELP)
    sub.add_argument("--format", required=True, choices=["torchscript", "onnx", "bundle"])
    sub.add_argument("-o", "--output", required=True, help="output folder")
    sub.add_argument(
        "--sample", help="CT used for the numerical check (default: a test case of the run)"
    )
    sub.set_defaults(func=cmd_export)


def cmd_evaluate(args: argparse.Namespace, load_model: ModelLoader | None = None) -> int:
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

    inputs = [path for path in (args.split, args.labels_json) if path]
    if args.csv:  # cheap checks first: the model and the data take a while to load
        check_scores_csv(args.csv, inputs)
    split = read_split(args.split, require=[args.subset]) if args.split else None
    device = resolve_device(args.device)
    model = _open_model(args.model, device, args.backend, load_model)
    dataset = load_dataset(args.data, labels_json=args.labels_json)
    case_ids = [case.case_id for case in dataset.cases]
    if split is not None:
        case_ids = getattr(split, args.subset)
        if not case_ids:
            raise MTKDError(f"the split's '{args.subset}' list is empty", path=args.split)
    inputs += [case.image for case in dataset.cases] + [c.label for c in dataset.cases if c.label]
    output = Path(args.csv or Path(model.folder).parent / "report" / "evaluation.csv")
    check_scores_csv(output, inputs)
    postprocessing = postprocessing_from_args(args, model)
    scores = evaluate(Predictor(model, device, postprocessing=postprocessing), dataset, case_ids)
    write_scores_csv(scores, output)
    print(f"{model.name}: {len(case_ids)} case(s), per-volume scores in {output}")
    print(summary_table(summarise(scores)))
    print(f"post-processing: {postprocessing.describe(model.labels) or 'none'}")
    return 0


def cmd_segment(args: argparse.Namespace, load_model: ModelLoader | None = None) -> int:
    from mtkd.data.ct_check import ct_intensity_warning
    from mtkd.data.image_io import check_writable, expand_image_inputs, read_image
    from mtkd.data.segnrrd import write_segmentation
    from mtkd.devices import resolve_device
    from mtkd.infer.output_paths import segment_outputs
    from mtkd.infer.predictor import Predictor
    from mtkd.infer.stages import stage

    budget = memory_budget_bytes(args)  # before anything is loaded
    progress = ProgressReporter(args.progress)
    device = resolve_device(args.device)
    images = expand_image_inputs(args.images)
    planned = segment_outputs(images, args.output, args.format, model=args.model)
    outputs = [check_writable(output) for output in planned]  # before anything is loaded
    progress(0.0, "loading the model")
    model = _open_model(args.model, device, args.backend, load_model)  # loaded once
    postprocessing = postprocessing_from_args(args, model)
    predictor = Predictor(model, device, postprocessing=postprocessing, memory_budget_bytes=budget)
    share = 0.9 / len(images)
    for index, (image_path, output) in enumerate(zip(images, outputs, strict=True)):
        start = 0.1 + index * share
        progress(start, f"reading {image_path.name}")
        with stage("read"):
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
        with stage("write"):
            write_segmentation(prediction.labelmap, predictor.model.labels, output)
        cleaned = postprocessing.describe(model.labels)
        cleaned = f"; post-processing: {cleaned}" if cleaned else ""
        print(f"{image_path} -> {output} ({prediction.seconds:.2f} s, {prediction.plan}{cleaned})")
    progress(1.0, "done")
    return 0


def _open_model(path: str, device, backend: str, load_model: ModelLoader | None):
    """The model of ``path`` with its network on ``backend``: loaded now, or by
    ``load_model`` (``mtkd serve``'s cache, which keeps it per backend; for "auto" it runs
    the plain model until the backends have been compared in the background)."""
    from mtkd.modelfiles.sources import load_any_model

    def on_backend(model):
        return model_on_backend(argparse.Namespace(backend=backend), model, device)

    if load_model is None:
        return on_backend(load_any_model(path, device))
    return load_model(
        path, device, prepare=on_backend, variant=backend, background=backend == "auto"
    )


def _segmenter(
    path: str, labels_json: str | None, device, load_model: ModelLoader | None, backend: str
):
    """A model (any source) or a stored segmentation of another tool, for ``compare``."""
    from mtkd.data.labels import LabelTable
    from mtkd.infer.predictor import Predictor
    from mtkd.infer.segmenters import ModelSegmenter, StoredSegmentation
    from mtkd.modelfiles.sources import is_stored_output

    if is_stored_output(path):
        labels = LabelTable.from_json(labels_json) if labels_json else None
        return StoredSegmentation(path, labels)
    from mtkd.infer.postprocess import stored_postprocessing

    # as `mtkd segment` gives it: its chosen post-processing
    model = _open_model(path, device, backend, load_model)
    postprocessing = stored_postprocessing(model.metadata, model.labels, model.folder)
    return ModelSegmenter(Predictor(model, device, postprocessing=postprocessing))


def cmd_compare(args: argparse.Namespace, load_model: ModelLoader | None = None) -> int:
    from mtkd.data.atomic import removed_if_left_empty
    from mtkd.data.ct_check import ct_intensity_warning
    from mtkd.data.image_io import check_writable, read_image, read_label
    from mtkd.data.labels import LabelTable
    from mtkd.data.segnrrd import write_segmentation
    from mtkd.devices import resolve_device
    from mtkd.infer.compare import compare
    from mtkd.infer.comparison_files import comparison_paths, write_comparison
    from mtkd.infer.comparison_table import format_comparison
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
    teacher = _segmenter(args.teacher, args.teacher_labels, device, load_model, args.backend)
    progress(0.15, "loading the student")
    student = _segmenter(args.student, args.student_labels, device, load_model, args.backend)
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
