"""``mtkd ablate``: a grid of distillation variants over seeds, trained, scored and tabled."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mtkd.cli.options import TRAIN_DEVICE_HELP


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Add ``ablate`` to the ``mtkd`` subcommands."""
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
    sub.add_argument("--device", help=TRAIN_DEVICE_HELP)
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
        help="run only these cells (a swept method's name: all its sub-cells); the others "
        "are left for a later call; the reports hold these and the cells an earlier pass "
        "finished, and name the rest",
    )
    sub.set_defaults(func=cmd_ablate)


def cmd_ablate(args: argparse.Namespace) -> int:
    from mtkd.ablation.plan import planned_runs
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
    splits = f" x {len(ablation.splits)} split seed(s)" if ablation.split_seeds else ""
    print(
        f"ablation {ablation.name}: {len(ablation.cells)} cell(s){splits} x "
        f"{len(ablation.seeds)} seed(s): {planned_runs(ablation, ablation.cells)} run(s)"
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
