"""The ``mtkd`` command line: the top-level parser and :func:`main`.

Each subcommand (or group of related ones) lives in a module of its own that adds its parser
(``add_parsers(commands)``) next to the ``cmd_*`` function that runs it; the engine is imported
inside those functions, so ``mtkd --help`` stays quick.
"""

from __future__ import annotations

import argparse
import sys

import mtkd
from mtkd.cli import (
    ablate,
    about,
    data,
    demo,
    inference,
    library,
    protocol,
    serve,
    taps,
    training,
)
from mtkd.errors import MTKDError

DESCRIPTION = "The ``mtkd`` command: one subcommand per job, each a thin call into the engine."
# The modules of the subcommands, in the order `mtkd --help` lists them.
COMMAND_MODULES = (training, inference, serve, taps, demo, data, protocol, ablate, library, about)


def build_parser() -> argparse.ArgumentParser:
    """The ``mtkd`` parser; each parsed subcommand carries its ``cmd_*`` function as ``func``."""
    parser = argparse.ArgumentParser(prog="mtkd", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"mtkd {mtkd.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``mtkd ARGV``; the exit status: 0, 2 on an :class:`MTKDError`, 130 when interrupted."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MTKDError as error:
        print(f"mtkd: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mtkd: interrupted", file=sys.stderr)
        return 130
