"""``mtkd protocol``: a whole experiment preset, stage by stage, then its test report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Add ``protocol`` to the ``mtkd`` subcommands."""
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
