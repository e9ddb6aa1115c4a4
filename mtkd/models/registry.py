"""Networks by name: build teachers and students with keyword sizes, and know their taps.

``build_network("unet", spatial_dims=2, channels=(8, 16, 32))`` builds a network;
``network_info(name, **params)`` says where its encoder, bottleneck and last decoder features
are (module names usable as taps) and what its input sizes must divide by;
``build_teacher`` wraps it in a :class:`MultiTaskNet` with a reconstruction decoder.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from mtkd.errors import MTKDError
from mtkd.models import monai_nets
from mtkd.models.monai_nets import TapLayout
from mtkd.models.multitask import MultiTaskNet
from mtkd.models.thesis_unet import (
    ThesisUNet,
    check_spatial_dims,
    thesis_s1,
    thesis_s2,
    thesis_t1_backbone,
)

Layout = Callable[[Mapping[str, Any]], TapLayout]
TEACHER_RECONSTRUCTION = ("masked", "unmasked", "none")


@dataclass(frozen=True)
class NetworkInfo:
    """What the registry knows about one network, for the parameters it was asked about.

    ``defaults`` are the builder's default parameters, ``params`` the defaults updated with the
    parameters given; the taps and ``size_multiple`` hold for ``params``. ``encoder_taps`` run
    shallow to deep and exclude the bottleneck.
    """

    name: str
    builder: Callable[..., nn.Module]
    description: str
    defaults: dict[str, Any]
    encoder_taps: list[str]
    bottleneck_tap: str
    decoder_tap: str
    size_multiple: int
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def taps(self) -> list[str]:
        """Encoder taps, bottleneck and last decoder feature, shallow to deep to output."""
        return [*self.encoder_taps, self.bottleneck_tap, self.decoder_tap]


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., nn.Module]
    layout: Layout
    description: str


_REGISTRY: dict[str, _Entry] = {}


def register_network(
    name: str, builder: Callable[..., nn.Module], layout: Layout, description: str
) -> None:
    """Add a network. ``builder``'s keyword parameters (each with a default, including
    ``spatial_dims`` and ``in_channels``) are the parameters the network accepts; ``layout``
    maps the resolved parameters to its :class:`TapLayout`."""
    signature = inspect.signature(builder)
    missing = [p for p in ("spatial_dims", "in_channels") if p not in signature.parameters]
    no_default = [
        n for n, p in signature.parameters.items() if p.default is inspect.Parameter.empty
    ]
    if missing or no_default:
        raise MTKDError(
            f"builder of '{name}' needs keyword parameters with defaults, including spatial_dims "
            f"and in_channels (missing: {missing}, without default: {no_default})"
        )
    _REGISTRY[name] = _Entry(builder, layout, description)


def available_networks() -> list[str]:
    """Registered network names, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise MTKDError(
            f"unknown network '{name}'; available networks: {', '.join(available_networks())}"
        )
    return _REGISTRY[name]


def _defaults(builder: Callable[..., nn.Module]) -> dict[str, Any]:
    return {n: p.default for n, p in inspect.signature(builder).parameters.items()}


def _describe_params(defaults: Mapping[str, Any]) -> str:
    return ", ".join(f"{n}={v!r}" for n, v in defaults.items())


def network_info(name: str, **params: Any) -> NetworkInfo:
    """Taps, size divisor and parameters of network ``name`` built with ``params``.

    Unknown names or parameters, and parameters whose layout is invalid, raise MTKDError
    listing the valid names or the network's parameters.
    """
    entry = _entry(name)
    defaults = _defaults(entry.builder)
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise MTKDError(
            f"unknown parameter(s) {', '.join(unknown)} for network '{name}'; its parameters: "
            f"{_describe_params(defaults)}"
        )
    resolved = {**defaults, **params}
    check_spatial_dims(resolved["spatial_dims"])
    try:
        layout = entry.layout(resolved)
    except MTKDError as err:
        raise MTKDError(f"network '{name}': {err.problem}") from None
    except (TypeError, ValueError, KeyError, IndexError) as err:
        raise MTKDError(
            f"invalid parameters for network '{name}' ({err}); its parameters: "
            f"{_describe_params(defaults)}"
        ) from None
    return NetworkInfo(
        name=name,
        builder=entry.builder,
        description=entry.description,
        defaults=defaults,
        encoder_taps=list(layout.encoder_taps),
        bottleneck_tap=layout.bottleneck_tap,
        decoder_tap=layout.decoder_tap,
        size_multiple=layout.size_multiple,
        params=resolved,
    )


def build_network(name: str, **params: Any) -> nn.Module:
    """Build network ``name`` with keyword sizes ``params`` (see :func:`network_info`)."""
    info = network_info(name, **params)
    try:
        return info.builder(**info.params)
    except MTKDError as err:
        raise MTKDError(f"network '{name}': {err.problem}") from None
    except Exception as err:  # noqa: BLE001 - any builder failure is a parameter problem
        raise MTKDError(
            f"cannot build network '{name}' with {params}: {type(err).__name__}: {err}; its "
            f"parameters: {_describe_params(info.defaults)}"
        ) from None


def build_teacher(
    name: str,
    reconstruction: str = "masked",
    *,
    mask_ratio: float = 0.5,
    mask_patch: int = 8,
    recon_convs: int | None = None,
    **params: Any,
) -> nn.Module:
    """A teacher: network ``name`` with a reconstruction decoder (:class:`MultiTaskNet`).

    Args:
        name: registered network (the backbone, which gives the segmentation).
        reconstruction: "masked" (default), "unmasked" (thesis original) or "none" (the plain
            network, no reconstruction decoder).
        mask_ratio, mask_patch: patch masking used in "masked" mode.
        recon_convs: convs per reconstruction decoder block; default the backbone's
            ``convs_per_block`` if it has one (thesis U-Nets), else 2.
        params: the network's parameters.
    """
    if reconstruction not in TEACHER_RECONSTRUCTION:
        raise MTKDError(
            f"reconstruction must be one of {TEACHER_RECONSTRUCTION}, not {reconstruction!r}"
        )
    info = network_info(name, **params)
    backbone = build_network(name, **params)
    if reconstruction == "none":
        return backbone
    convs = recon_convs if recon_convs is not None else getattr(backbone, "convs_per_block", 2)
    return MultiTaskNet(
        backbone,
        encoder_taps=info.encoder_taps,
        bottleneck_tap=info.bottleneck_tap,
        in_channels=info.params["in_channels"],
        spatial_dims=info.params["spatial_dims"],
        size_multiple=info.size_multiple,
        convs_per_block=convs,
        reconstruction_mode=reconstruction,
        mask_ratio=mask_ratio,
        mask_patch=mask_patch,
    )


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (only those with ``requires_grad`` if asked)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --- the thesis U-Nets ----------------------------------------------------------------------


def build_thesis_unet(
    spatial_dims: int = 2,
    in_channels: int = 3,
    out_channels: int = 1,
    channels: tuple[int, ...] = (16, 32),
    bottleneck: int = 64,
    convs_per_block: int = 1,
) -> nn.Module:
    """:class:`ThesisUNet` with any widths."""
    return ThesisUNet(
        in_channels, out_channels, channels, bottleneck, convs_per_block, spatial_dims
    )


def _thesis_layout(levels: int) -> TapLayout:
    return TapLayout(
        [f"enc{i}" for i in range(1, levels + 1)], "bottleneck", f"dec{levels}", 2**levels
    )


def _preset(factory: Callable[..., ThesisUNet]) -> Callable[..., nn.Module]:
    def build(spatial_dims: int = 2, in_channels: int = 3, out_channels: int = 1) -> nn.Module:
        return factory(in_channels, out_channels, spatial_dims)

    build.__doc__ = factory.__doc__
    build.__name__ = build.__qualname__ = f"build_{factory.__name__}"
    return build


register_network(
    "thesis_unet",
    build_thesis_unet,
    lambda p: _thesis_layout(len(p["channels"])),
    "Thesis U-Net, any widths: conv-BN-ReLU blocks, max-pool, transposed-conv decoder.",
)
register_network(
    "thesis_s1",
    _preset(thesis_s1),
    lambda p: _thesis_layout(2),
    "Thesis student S1: 16/32, bottleneck 64, 1 conv per block (57,297 params, 3->1).",
)
register_network(
    "thesis_s2",
    _preset(thesis_s2),
    lambda p: _thesis_layout(2),
    "Thesis student S2: 32/64, bottleneck 128, 1 conv per block (227,233 params, 3->1).",
)
register_network(
    "thesis_t1_backbone",
    _preset(thesis_t1_backbone),
    lambda p: _thesis_layout(4),
    "Thesis teacher T1's U-Net: 64/128/256/512, bottleneck 1024, 2 convs per block.",
)
register_network(
    "unet",
    monai_nets.build_unet,
    monai_nets.unet_layout,
    "MONAI UNet (residual units, strided-conv encoder).",
)
register_network(
    "basic_unet",
    monai_nets.build_basic_unet,
    monai_nets.basic_unet_layout,
    "MONAI BasicUNet (four 2x levels).",
)
register_network(
    "segresnet",
    monai_nets.build_segresnet,
    monai_nets.segresnet_layout,
    "MONAI SegResNet (residual encoder, light decoder).",
)
register_network(
    "swinunetr",
    monai_nets.build_swinunetr,
    monai_nets.swinunetr_layout,
    "MONAI SwinUNETR (Swin transformer encoder; inputs divisible by 32; needs einops).",
)
register_network(
    "dynunet",
    monai_nets.build_dynunet,
    monai_nets.dynunet_layout,
    "MONAI DynUNet (nnU-Net style; depth or explicit kernel sizes and strides).",
)
