"""The options that several subcommands share: help texts, and the post-processing options."""

DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"
TRAIN_DEVICE_HELP = "override train.device (auto, cpu, cuda, cuda:N, mps)"
PROGRESS_HELP = "print machine-readable MTKD-PROGRESS lines (for the Slicer modules)"
MODEL_HELP = (
    "run or model folder, exported TorchScript/ONNX folder, training checkpoint, MONAI bundle "
    "(folder or .zip) or TorchScript file"
)


def add_postprocessing_options(sub) -> None:
    """``--keep-largest``, ``--min-part-ml`` and ``--fill-holes`` on ``sub`` (an argparse
    subparser)."""
    group = sub.add_argument_group("post-processing of the label maps (default: none)")
    group.add_argument(
        "--keep-largest",
        nargs="*",
        metavar="STRUCTURE",
        help="keep only the largest connected part of these structures (no name: of every "
        "structure); the rest becomes background",
    )
    group.add_argument(
        "--min-part-ml",
        type=float,
        default=0.0,
        metavar="ML",
        help="remove every structure's connected parts smaller than ML millilitres",
    )
    group.add_argument(
        "--fill-holes",
        action="store_true",
        help="fill the background holes each structure encloses",
    )


def postprocessing_from_args(args, labels):
    """The :class:`mtkd.infer.postprocess.PostProcessing` the options ask for, for a model's
    ``labels`` (a LabelTable)."""
    from mtkd.infer.postprocess import postprocessing_for

    return postprocessing_for(
        labels,
        largest_only=args.keep_largest,
        min_volume_ml=args.min_part_ml,
        fill_holes=args.fill_holes,
    )
