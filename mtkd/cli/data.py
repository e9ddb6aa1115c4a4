"""``mtkd synth``: a cohort of synthetic CT phantoms in the MSD layout."""

from __future__ import annotations

import argparse


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Add ``synth`` to the ``mtkd`` subcommands."""
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
