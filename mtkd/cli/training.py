"""``mtkd train`` and ``mtkd distill``: a run from a configuration, or a stopped run resumed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mtkd.cli.options import TRAIN_DEVICE_HELP
from mtkd.errors import MTKDError


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``distill`` (the same options) to the ``mtkd`` subcommands."""
    for name, function, text in (
        ("train", cmd_train, "train a teacher (multi-task) or a plain network"),
        ("distill", cmd_distill, "distil a student from a trained teacher"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("config", nargs="?", help="run configuration (YAML)")
        sub.add_argument("--run-dir", help="run folder (default runs/<name>)")
        sub.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run")
        sub.add_argument("--device", help=TRAIN_DEVICE_HELP)
        sub.set_defaults(func=function)


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
