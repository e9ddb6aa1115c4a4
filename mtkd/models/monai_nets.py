"""MONAI networks as teachers or students: builders with keyword sizes, and their tap layouts.

Each ``build_*`` function's keyword parameters (and defaults) are the parameters the registry
accepts for that network. Each ``*_layout`` function gives, for the same parameters, the module
names of the encoder features (shallow to deep), the bottleneck, the last decoder feature and the
spatial size divisor; all of them were checked to fire as forward hooks in MONAI 1.6.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from monai.networks.nets import BasicUNet, DynUNet, SegResNet, SwinUNETR, UNet
from torch import nn

from mtkd.errors import MTKDError

IntOrSeq = int | Sequence[int]


class TapLayout(NamedTuple):
    """Where a network's multi-scale features are, by module name."""

    encoder_taps: list[str]
    bottleneck_tap: str
    decoder_tap: str
    size_multiple: int


def _total_stride(strides: Sequence[IntOrSeq], spatial_dims: int) -> int:
    """Least common multiple over the spatial dims of the product of the per-level strides."""
    per_dim = [1] * spatial_dims
    for stride in strides:
        values = (stride,) * spatial_dims if isinstance(stride, int) else tuple(stride)
        if len(values) != spatial_dims:
            raise MTKDError(f"stride {stride!r} does not have {spatial_dims} entries")
        per_dim = [p * int(v) for p, v in zip(per_dim, values)]
    return math.lcm(*per_dim)


# --- monai.networks.nets.UNet ---------------------------------------------------------------


def _one_per_transition(
    network: str, levels_name: str, levels: Sequence, name: str, given: Sequence | None, default
) -> list:
    """``given`` (or ``default`` repeated): one entry per transition between ``levels``."""
    if len(levels) < 2:
        raise MTKDError(f"{network} needs at least 2 {levels_name} entries, got {tuple(levels)}")
    if given is None:
        return [default] * (len(levels) - 1)
    if len(given) != len(levels) - 1:
        raise MTKDError(
            f"{network} needs len({name}) == len({levels_name}) - 1, got {levels_name}="
            f"{tuple(levels)}, {name}={tuple(given)}"
        )
    return list(given)


def unet_strides(channels: Sequence[int], strides: Sequence[IntOrSeq] | None) -> list[IntOrSeq]:
    """UNet's strides, one per transition between ``channels`` (default 2 each), checked."""
    return _one_per_transition("unet", "channels", channels, "strides", strides, 2)


def build_unet(
    spatial_dims: int = 3,
    in_channels: int = 1,
    out_channels: int = 2,
    channels: Sequence[int] = (16, 32, 64, 128, 256),
    strides: Sequence[IntOrSeq] | None = None,
    num_res_units: int = 2,
    kernel_size: IntOrSeq = 3,
    up_kernel_size: IntOrSeq = 3,
    act: tuple | str = "PRELU",
    norm: tuple | str = "INSTANCE",
    dropout: float = 0.0,
) -> nn.Module:
    """MONAI UNet; ``strides`` default to 2 between consecutive ``channels``."""
    return UNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=tuple(channels),
        strides=tuple(unet_strides(channels, strides)),
        kernel_size=kernel_size,
        up_kernel_size=up_kernel_size,
        num_res_units=num_res_units,
        act=act,
        norm=norm,
        dropout=dropout,
    )


def unet_layout(params: Mapping[str, Any]) -> TapLayout:
    """MONAI UNet nests each level in ``Sequential(down, SkipConnection(deeper), up)``.

    Level k (0-based) lives at ``model`` + ``.1.submodule`` * k; its encoder is ``.0`` and its
    decoder ``.2``. The first encoder already downsamples, so encoder taps are at strides
    2, 4, ...; the bottleneck is the innermost ``submodule``. The top decoder (``model.2``) is
    the output layer, so the last decoder feature is ``model.1.submodule.2`` (channels[0]
    channels, half resolution) when there are at least 3 levels.
    """
    channels = params["channels"]
    strides = unet_strides(channels, params["strides"])
    depth = len(channels)
    prefixes = ["model" + ".1.submodule" * k for k in range(depth)]
    decoder = f"{prefixes[1]}.2" if depth > 2 else "model.2"
    return TapLayout(
        encoder_taps=[f"{prefix}.0" for prefix in prefixes[:-1]],
        bottleneck_tap=prefixes[-1],
        decoder_tap=decoder,
        size_multiple=_total_stride(strides, params["spatial_dims"]),
    )


# --- monai.networks.nets.BasicUNet ----------------------------------------------------------


def build_basic_unet(
    spatial_dims: int = 3,
    in_channels: int = 1,
    out_channels: int = 2,
    features: Sequence[int] = (32, 32, 64, 128, 256, 32),
    dropout: float = 0.0,
    upsample: str = "deconv",
) -> nn.Module:
    """MONAI BasicUNet (four 2x downsamplings; ``features`` has 6 entries)."""
    if len(features) != 6:
        raise MTKDError(f"basic_unet needs 6 features, got features={tuple(features)}")
    return BasicUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        features=tuple(features),
        dropout=dropout,
        upsample=upsample,
    )


def basic_unet_layout(params: Mapping[str, Any]) -> TapLayout:
    """``conv_0`` (full resolution), ``down_1..3``, bottleneck ``down_4``, decoder ``upcat_1``."""
    return TapLayout(["conv_0", "down_1", "down_2", "down_3"], "down_4", "upcat_1", 16)


# --- monai.networks.nets.SegResNet ----------------------------------------------------------


def segresnet_blocks_up(blocks_down: Sequence[int], blocks_up: Sequence[int] | None) -> tuple:
    """SegResNet's up blocks, one per transition of ``blocks_down`` (default 1 each), checked."""
    return tuple(
        _one_per_transition("segresnet", "blocks_down", blocks_down, "blocks_up", blocks_up, 1)
    )


def build_segresnet(
    spatial_dims: int = 3,
    in_channels: int = 1,
    out_channels: int = 2,
    init_filters: int = 8,
    blocks_down: Sequence[int] = (1, 2, 2, 4),
    blocks_up: Sequence[int] | None = None,
    dropout_prob: float | None = None,
    upsample_mode: str = "nontrainable",
) -> nn.Module:
    """MONAI SegResNet; ``blocks_up`` default to one block per decoder level."""
    return SegResNet(
        spatial_dims=spatial_dims,
        init_filters=init_filters,
        in_channels=in_channels,
        out_channels=out_channels,
        dropout_prob=dropout_prob,
        blocks_down=tuple(blocks_down),
        blocks_up=segresnet_blocks_up(blocks_down, blocks_up),
        upsample_mode=upsample_mode,
    )


def segresnet_layout(params: Mapping[str, Any]) -> TapLayout:
    """``down_layers.0`` (full resolution) .. ``down_layers.N-2``, bottleneck ``down_layers.N-1``,
    last decoder ``up_layers.M-1``."""
    levels = len(params["blocks_down"])
    ups = len(segresnet_blocks_up(params["blocks_down"], params["blocks_up"]))
    return TapLayout(
        encoder_taps=[f"down_layers.{i}" for i in range(levels - 1)],
        bottleneck_tap=f"down_layers.{levels - 1}",
        decoder_tap=f"up_layers.{ups - 1}",
        size_multiple=2 ** (levels - 1),
    )


# --- monai.networks.nets.SwinUNETR ----------------------------------------------------------


def build_swinunetr(
    spatial_dims: int = 3,
    in_channels: int = 1,
    out_channels: int = 2,
    feature_size: int = 48,
    depths: Sequence[int] = (2, 2, 2, 2),
    num_heads: Sequence[int] = (3, 6, 12, 24),
    drop_rate: float = 0.0,
    attn_drop_rate: float = 0.0,
    dropout_path_rate: float = 0.0,
    use_checkpoint: bool = False,
    use_v2: bool = False,
) -> nn.Module:
    """MONAI SwinUNETR (needs ``einops``; ``feature_size`` divisible by 12; inputs divisible by 32,
    and with instance norm at least one side of 64 so the deepest map has 2 voxels)."""
    if importlib.util.find_spec("einops") is None:
        raise MTKDError("swinunetr needs the 'einops' package (pip install einops)")
    return SwinUNETR(
        in_channels=in_channels,
        out_channels=out_channels,
        feature_size=feature_size,
        depths=tuple(depths),
        num_heads=tuple(num_heads),
        drop_rate=drop_rate,
        attn_drop_rate=attn_drop_rate,
        dropout_path_rate=dropout_path_rate,
        use_checkpoint=use_checkpoint,
        spatial_dims=spatial_dims,
        use_v2=use_v2,
    )


def swinunetr_layout(params: Mapping[str, Any]) -> TapLayout:
    """``encoder1..4`` (strides 1, 2, 4, 8), bottleneck ``encoder10`` (stride 32), last decoder
    ``decoder1``. Hooks on ``swinViT.layersN`` never fire in MONAI 1.6; the encoders do."""
    return TapLayout(["encoder1", "encoder2", "encoder3", "encoder4"], "encoder10", "decoder1", 32)


# --- monai.networks.nets.DynUNet ------------------------------------------------------------


def dynunet_strides(depth: int | None, strides: Sequence[IntOrSeq] | None) -> list[IntOrSeq]:
    """DynUNet's strides: ``strides`` checked, or 1 then 2 per level for ``depth`` levels."""
    if strides is None:
        depth = 4 if depth is None else depth
        if depth < 2:
            raise MTKDError(f"dynunet needs depth >= 2, got depth={depth}")
        return [1] + [2] * depth
    strides = list(strides)
    if depth is not None and depth != len(strides) - 1:
        raise MTKDError(
            f"dynunet depth={depth} disagrees with strides={tuple(strides)} "
            f"(depth is len(strides) - 1); give one of them"
        )
    if len(strides) < 3:
        raise MTKDError(f"dynunet needs at least 3 strides, got strides={tuple(strides)}")
    return strides


def build_dynunet(
    spatial_dims: int = 3,
    in_channels: int = 1,
    out_channels: int = 2,
    depth: int | None = None,
    kernel_size: Sequence[IntOrSeq] | None = None,
    strides: Sequence[IntOrSeq] | None = None,
    upsample_kernel_size: Sequence[IntOrSeq] | None = None,
    filters: Sequence[int] | None = None,
    res_block: bool = False,
    dropout: float | None = None,
) -> nn.Module:
    """MONAI DynUNet (nnU-Net style). Without ``strides``: ``depth`` (default 4) 2x
    downsamplings after a stride-1 input block; kernel sizes default to 3 and upsampling
    kernels to the strides."""
    strides = dynunet_strides(depth, strides)
    kernel_size = [3] * len(strides) if kernel_size is None else list(kernel_size)
    if upsample_kernel_size is None:
        upsample_kernel_size = strides[1:]
    return DynUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernel_size,
        strides=strides,
        upsample_kernel_size=list(upsample_kernel_size),
        filters=None if filters is None else list(filters),
        dropout=dropout,
        res_block=res_block,
    )


def dynunet_layout(params: Mapping[str, Any]) -> TapLayout:
    """``input_block``, ``downsamples.0..L-3``, bottleneck ``bottleneck``, last decoder
    ``upsamples.L-2`` (L = number of strides)."""
    strides = dynunet_strides(params["depth"], params["strides"])
    levels = len(strides)
    return TapLayout(
        encoder_taps=["input_block"] + [f"downsamples.{i}" for i in range(levels - 2)],
        bottleneck_tap="bottleneck",
        decoder_tap=f"upsamples.{levels - 2}",
        size_multiple=_total_stride(strides, params["spatial_dims"]),
    )
