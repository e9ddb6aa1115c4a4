"""``mtkd demo``: teacher, distilled student and segmentation on the bundled CT."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Add ``demo`` to the ``mtkd`` subcommands."""
    sub = commands.add_parser(
        "demo", help="teacher -> distilled student -> segmentation on the bundled CT"
    )
    sub.add_argument("--output", default="runs/demo", help="folder for the demo's runs")
    sub.add_argument("--ct", help="CT image (default: the bundled abdomen sample)")
    sub.add_argument("--labels", help="its label map, TotalSegmentator ids (default: bundled)")
    sub.add_argument("--quick", action="store_true", help="a few epochs only (smoke test)")
    sub.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from mtkd.demo import run_demo

    run_demo(Path(args.output), ct=args.ct, labels=args.labels, quick=args.quick)
    return 0
