"""The thesis U-Nets: students S1/S2 and the backbone of teacher T1, in 2-D or 3-D.

Module names are tap names: ``enc1..encN`` (shallow to deep), ``bottleneck``,
``up1..upN`` and ``dec1..decN`` (deep to shallow; ``decN`` is the last,
full-resolution decoder feature) and ``head``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from mtkd.errors import MTKDError

CONV = {2: nn.Conv2d, 3: nn.Conv3d}
CONV_TRANSPOSE = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {2: F.max_pool2d, 3: F.max_pool3d}


def check_spatial_dims(spatial_dims: int) -> int:
    """Return ``spatial_dims`` if it is 2 or 3, else raise MTKDError."""
    if spatial_dims not in (2, 3):
        raise MTKDError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return spatial_dims


def require_divisible(x: torch.Tensor, multiple: int, network: str) -> None:
    """Raise MTKDError unless every spatial size of ``x`` (B, C, *S) divides by ``multiple``."""
    spatial = tuple(x.shape[2:])
    if any(size % multiple for size in spatial):
        raise MTKDError(
            f"{network} needs spatial sizes divisible by {multiple}; got input of spatial size "
            f"{spatial} (pad or resize the input, e.g. to a multiple of {multiple})"
        )


def conv_block(in_channels: int, out_channels: int, convs: int, spatial_dims: int) -> nn.Sequential:
    """``convs`` x (3x3[x3] conv with bias, BatchNorm, ReLU): (B, C_in, *S) -> (B, C_out, *S)."""
    if convs < 1:
        raise MTKDError(f"convs_per_block must be at least 1, got {convs}")
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [
            CONV[spatial_dims](in_channels if i == 0 else out_channels, out_channels, 3, padding=1),
            _NORM[spatial_dims](out_channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


class ThesisUNet(nn.Module):
    """Plain U-Net of the thesis.

    Input (B, in_channels, *S) with every size of S divisible by ``2 ** len(channels)``;
    output logits (B, out_channels, *S). Level ``i`` (1-based) of the encoder, ``enc{i}``,
    gives (B, channels[i-1], *S / 2**(i-1)); ``bottleneck`` gives
    (B, bottleneck, *S / 2**N); ``dec{j}`` gives (B, channels[N-j], *S / 2**(N-j)),
    so ``dec{N}`` is at full resolution.

    Args:
        in_channels: input channels (3 in the thesis: the slice repeated or neighbours).
        out_channels: output logit channels (1 for binary sigmoid segmentation).
        channels: encoder widths, shallow to deep; one level per entry.
        bottleneck: bottleneck width.
        convs_per_block: conv-BN-ReLU repetitions per block (1 for students, 2 for T1).
        spatial_dims: 2 or 3.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (16, 32),
        bottleneck: int = 64,
        convs_per_block: int = 1,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        channels = tuple(int(c) for c in channels)
        if not channels or min(channels + (bottleneck, in_channels, out_channels)) < 1:
            raise MTKDError(
                "ThesisUNet needs at least one encoder level and positive channel counts; got "
                f"channels={channels}, bottleneck={bottleneck}, in_channels={in_channels}, "
                f"out_channels={out_channels}"
            )
        self.spatial_dims = spatial_dims
        self.levels = len(channels)
        self.convs_per_block = convs_per_block
        self.size_multiple = 2**self.levels
        widths = (in_channels,) + channels
        for i in range(self.levels):
            block = conv_block(widths[i], widths[i + 1], convs_per_block, spatial_dims)
            self.add_module(f"enc{i + 1}", block)
        self.bottleneck = conv_block(channels[-1], bottleneck, convs_per_block, spatial_dims)
        deeper = bottleneck
        for j, width in enumerate(reversed(channels), start=1):
            self.add_module(f"up{j}", CONV_TRANSPOSE[spatial_dims](deeper, width, 2, stride=2))
            self.add_module(f"dec{j}", conv_block(2 * width, width, convs_per_block, spatial_dims))
            deeper = width
        self.head = CONV[spatial_dims](channels[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, *S) -> logits (B, out_channels, *S)."""
        if x.dim() != self.spatial_dims + 2:
            raise MTKDError(
                f"ThesisUNet ({self.spatial_dims}-D) expects input (B, C) + {self.spatial_dims} "
                f"spatial sizes, got shape {tuple(x.shape)}"
            )
        require_divisible(x, self.size_multiple, f"ThesisUNet with {self.levels} levels")
        pool = _POOL[self.spatial_dims]
        skips = []
        for i in range(1, self.levels + 1):
            x = self.get_submodule(f"enc{i}")(x)
            skips.append(x)
            x = pool(x, 2)
        x = self.bottleneck(x)
        for j in range(1, self.levels + 1):
            x = self.get_submodule(f"up{j}")(x)
            x = torch.cat([x, skips[-j]], dim=1)
            x = self.get_submodule(f"dec{j}")(x)
        return self.head(x)


def thesis_s1(in_channels: int = 3, out_channels: int = 1, spatial_dims: int = 2) -> ThesisUNet:
    """Student S1: channels 16/32, bottleneck 64, one conv per block (57,297 params at 3->1)."""
    return ThesisUNet(in_channels, out_channels, (16, 32), 64, 1, spatial_dims)


def thesis_s2(in_channels: int = 3, out_channels: int = 1, spatial_dims: int = 2) -> ThesisUNet:
    """Student S2: channels 32/64, bottleneck 128, one conv per block (227,233 params at 3->1)."""
    return ThesisUNet(in_channels, out_channels, (32, 64), 128, 1, spatial_dims)


def thesis_t1_backbone(
    in_channels: int = 3, out_channels: int = 1, spatial_dims: int = 2
) -> ThesisUNet:
    """Teacher T1's segmentation U-Net: 64/128/256/512, bottleneck 1024, two convs per block."""
    return ThesisUNet(in_channels, out_channels, (64, 128, 256, 512), 1024, 2, spatial_dims)
