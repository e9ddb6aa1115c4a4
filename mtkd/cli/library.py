"""``mtkd library list|import|delete``: the model library's models."""

from __future__ import annotations

import argparse
import sys


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Add ``library`` and its ``list``, ``import`` and ``delete`` to the ``mtkd`` subcommands."""
    sub = commands.add_parser(
        "library", help="list, import and delete the models of the model library"
    )
    library = sub.add_subparsers(dest="library_command", required=True)
    root_help = "library folder (default: $MTKD_LIBRARY, else ~/.mtkd/models)"
    item = library.add_parser("list", help="list the library's models")
    item.add_argument("--root", help=root_help)
    item.set_defaults(func=cmd_library_list)
    item = library.add_parser("import", help="copy a model into the library, checked")
    item.add_argument(
        "source",
        help="run or model folder, exported TorchScript/ONNX folder, MONAI bundle folder, "
        "or a .zip of one",
    )
    item.add_argument("--name", help="display name (default: the model's own name)")
    item.add_argument("--root", help=root_help)
    item.set_defaults(func=cmd_library_import)
    item = library.add_parser("delete", help="remove a model from the library")
    item.add_argument("key", help="the model's key (first column of `mtkd library list`)")
    item.add_argument("--root", help=root_help)
    item.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    item.set_defaults(func=cmd_library_delete)


def _library(args: argparse.Namespace):
    from mtkd.library import ModelLibrary, default_library_root

    return ModelLibrary(args.root or default_library_root())


def _size_text(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB" if size >= 1 << 20 else f"{size / 1024:.0f} KiB"


def cmd_library_list(args: argparse.Namespace) -> int:
    library = _library(args)
    library.check_root()
    entries = library.entries()
    others = library.other_folders()
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        print(
            f"mtkd: note: not library entries (no valid library_entry.json), left alone: "
            f"{len(others)} folder(s) in {library.root}: {shown}",
            file=sys.stderr,
        )
    if not entries:
        missing = "" if library.root.is_dir() else " (the folder does not exist yet)"
        print(f"no models in {library.root}{missing}")
        return 0
    print(f"{len(entries)} model(s) in {library.root}")
    for entry in entries:
        if entry.problem:
            print(f"{entry.key:<24} PROBLEM: {entry.problem}")
            continue
        dice = "n/a" if entry.validation_dice is None else f"{entry.validation_dice:.3f}"
        print(
            f"{entry.key:<24} {entry.name}  [{entry.format}]  {_size_text(entry.size_bytes)}  "
            f"val Dice {dice}  labels: {', '.join(entry.labels)}"
        )
        if entry.teacher:
            print(f"{'':<24} teacher: {entry.teacher}")
    return 0


def cmd_library_import(args: argparse.Namespace) -> int:
    library = _library(args)
    entry = library.import_model(args.source, name=args.name)
    print(
        f"imported {entry.key}: {entry.name} [{entry.format}], {len(entry.labels)} label(s), "
        f"{_size_text(entry.size_bytes)} -> {entry.path}"
    )
    return 0


def cmd_library_delete(args: argparse.Namespace) -> int:
    library = _library(args)
    entry = library.get(args.key)
    if not args.yes:
        try:
            answer = input(f"delete {entry.key} ({entry.name}) at {entry.path}? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("not deleted")
            return 1
    library.delete(entry.key)
    print(f"deleted {entry.key}")
    return 0
