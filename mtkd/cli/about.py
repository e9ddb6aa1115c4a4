"""``mtkd config`` and ``mtkd env``: what mtkd is configured with and what it runs on."""

from __future__ import annotations

import argparse


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Add ``config`` and ``env`` to the ``mtkd`` subcommands."""
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
