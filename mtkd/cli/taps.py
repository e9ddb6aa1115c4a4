"""``mtkd taps``: a network's tap names and output shapes, to choose distillation pairs."""

from __future__ import annotations

import argparse


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Add ``taps`` to the ``mtkd`` subcommands."""
    sub = commands.add_parser("taps", help="list a network's tap names and output shapes")
    sub.add_argument("model", help="registered network name (an unknown name lists them all)")
    sub.add_argument("--input-size", type=int, nargs="+", default=[128, 128], help="2 or 3 sizes")
    sub.add_argument("--in-channels", type=int, default=1)
    sub.add_argument("--out-channels", type=int, default=2)
    sub.add_argument("--reconstruction", default="none", choices=["none", "masked", "unmasked"])
    sub.set_defaults(func=cmd_taps)


def cmd_taps(args: argparse.Namespace) -> int:
    import torch

    from mtkd.models import build_teacher, network_info
    from mtkd.models.taps import list_taps

    info = network_info(args.model)
    dims = len(args.input_size)
    params = {
        "in_channels": args.in_channels,
        "out_channels": args.out_channels,
        "spatial_dims": dims,
    }
    network = build_teacher(args.model, reconstruction=args.reconstruction, **params)
    example = torch.zeros(1, args.in_channels, *args.input_size)
    prefix = "backbone." if args.reconstruction != "none" else ""
    marks = {prefix + info.bottleneck_tap: "B", prefix + info.decoder_tap: "D"}
    marks.update({prefix + name: f"E{i}" for i, name in enumerate(info.encoder_taps, start=1)})
    print(f"{args.model}: input {tuple(example.shape)}; E/B/D mark the registry's scale taps")
    for name, shape in list_taps(network, example):
        print(f"{marks.get(name, ''):>3}  {name:<48} {tuple(shape)}")
    return 0
