"""The options that several subcommands share: help texts, post-processing and backend."""

import sys

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
    group = sub.add_argument_group(
        "post-processing of the label maps (default: the model's choice on its validation "
        "cases, if it made one)"
    )
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
    group.add_argument(
        "--no-postprocessing",
        action="store_true",
        help="the network's labels as they are, without the post-processing the model chose "
        "on its validation cases",
    )


def postprocessing_from_args(args, model):
    """The :class:`mtkd.infer.postprocess.PostProcessing` for a loaded ``model``: the rules the
    options ask for; without any, the one the model chose on its validation cases (none with
    ``--no-postprocessing``, or for a model without a choice)."""
    from mtkd.infer.postprocess import PostProcessing, postprocessing_for, stored_postprocessing

    if args.no_postprocessing:
        return PostProcessing()
    if args.keep_largest is not None or args.min_part_ml or args.fill_holes:
        return postprocessing_for(
            model.labels,
            largest_only=args.keep_largest,
            min_volume_ml=args.min_part_ml,
            fill_holes=args.fill_holes,
        )
    return stored_postprocessing(model.metadata, model.labels, getattr(model, "folder", None))


BACKENDS = ("torch", "onnxruntime", "auto")


def add_backend_option(sub) -> None:
    """``--backend`` on ``sub`` (an argparse subparser)."""
    sub.add_argument(
        "--backend",
        choices=BACKENDS,
        default="torch",
        help="how a PyTorch network runs on the CPU: torch; onnxruntime (an ONNX export of "
        "its weights, cached per user and checked against torch); auto (the faster of the "
        "two on a probe input, measured when the model is loaded)",
    )


def add_memory_option(sub) -> None:
    """``--memory-limit`` on ``sub`` (an argparse subparser)."""
    sub.add_argument(
        "--memory-limit",
        type=float,
        metavar="MIB",
        help="memory the network's passes may use, in MiB (default: half of the free GPU "
        "memory or RAM); below a whole-volume pass's need, 3-D networks run in sliding "
        "windows and 2-D networks on fewer slices at a time",
    )


def memory_budget_bytes(args) -> int | None:
    """``--memory-limit`` in bytes (None when not given); MTKDError when not positive."""
    limit = getattr(args, "memory_limit", None)
    if limit is None:
        return None
    if not limit > 0:
        from mtkd.errors import MTKDError

        raise MTKDError(f"--memory-limit must be a positive number of MiB, not {limit}")
    return int(limit * (1 << 20))


def model_on_backend(args, model, device):
    """``model`` with its network on the backend ``args.backend`` names (said on stderr)."""
    backend = getattr(args, "backend", "torch")
    if backend == "torch":
        return model
    from mtkd.export.ort_backend import network_for_backend

    model, used = network_for_backend(model, backend, device)
    print(f"backend: {used}", file=sys.stderr)
    return model
