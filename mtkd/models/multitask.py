"""The multi-task teacher: one shared encoder, a segmentation decoder and a reconstruction decoder.

Any network whose encoder features can be reached by module name can be the backbone. The
backbone stays unmodified: its own output is the segmentation, and a U-Net-style
reconstruction decoder reads its bottleneck and encoder features through forward hooks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from mtkd.errors import MTKDError
from mtkd.models.taps import FeatureRecorder
from mtkd.models.thesis_unet import (
    CONV,
    CONV_TRANSPOSE,
    check_spatial_dims,
    conv_block,
    require_divisible,
)

RECONSTRUCTION_MODES = ("masked", "unmasked")
# Where the reconstruction loss is taken: every voxel, or the masked patches only (MAE).
RECONSTRUCTION_LOSS_ON = ("all", "masked")
# The running statistics of normalisation layers (BatchNorm, InstanceNorm with tracking).
_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")
_LINEAR_MODE = {2: "bilinear", 3: "trilinear"}


@dataclass(frozen=True)
class TapGeometry:
    """Channels and stride (input size / feature size, per spatial dim) of one tap."""

    name: str
    channels: int
    stride: tuple[float, ...]


def _as_tuple(value: int | Sequence[int], n: int, what: str) -> tuple[int, ...]:
    values = (value,) * n if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != n or min(values) < 1:
        raise MTKDError(f"{what} must be a positive int or {n} positive ints, got {value!r}")
    return values


def mask_patches(
    x: torch.Tensor,
    ratio: float = 0.5,
    patch: int | Sequence[int] = 8,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero a random ``ratio`` of the patches of each image.

    The patch grid covers the spatial dims (the last row of patches may be partial); each image
    of the batch gets its own random choice of ``round(ratio * n_patches)`` patches, the same for
    all channels.

    Args:
        x: (B, C, *S).
        ratio: share of patches to mask, in [0, 1].
        patch: patch side (or one side per spatial dim) in voxels.
        generator: optional random generator (on any device) for reproducible masks.

    Returns:
        ``(masked_x, mask)``: masked_x (B, C, *S) is ``x`` with masked voxels set to 0;
        mask (B, 1, *S) bool is True where the input was masked.
    """
    if not 0.0 <= ratio <= 1.0:
        raise MTKDError(f"mask ratio must be in [0, 1], got {ratio}")
    spatial = tuple(x.shape[2:])
    sides = _as_tuple(patch, len(spatial), "mask patch size")
    grid = tuple(math.ceil(s / p) for s, p in zip(spatial, sides))
    n_patches = math.prod(grid)
    n_masked = round(ratio * n_patches)
    device = generator.device if generator is not None else x.device
    scores = torch.rand((x.shape[0], n_patches), generator=generator, device=device)
    chosen = scores.argsort(dim=1)[:, :n_masked]
    grid_mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, chosen, True)
    mask = grid_mask.view(x.shape[0], 1, *grid).to(x.device)
    for dim, side in enumerate(sides, start=2):
        mask = mask.repeat_interleave(side, dim=dim)
    mask = mask[(slice(None), slice(None)) + tuple(slice(0, s) for s in spatial)]
    return x.masked_fill(mask, 0), mask


def reconstruction_loss(
    reconstruction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error (float32 scalar) of ``reconstruction`` and ``target`` (B, C, *S).

    Without ``mask``: over every voxel and channel. With ``mask`` (B, 1, *S) bool, True where
    the input was masked: over the masked voxels only (all channels), as in masked
    autoencoders (He et al., CVPR 2022), so the visible voxels, which the network could copy,
    do not count. A mask without any masked voxel gives 0 (with a gradient path).
    """
    with torch.autocast(device_type=reconstruction.device.type, enabled=False):
        error = (reconstruction.float() - target.float()) ** 2
        if mask is None:
            return error.mean()
        weight = mask.to(error.dtype).expand_as(error)
        return (error * weight).sum() / weight.sum().clamp_min(1.0)


@contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """Within the block, the normalisation layers of ``module`` work as before (batch
    statistics in training mode) but their running statistics (``running_mean``,
    ``running_var``, ``num_batches_tracked``) do not move.

    Each such buffer is replaced by a copy for the block, which the forward passes inside may
    update, and the original tensor is put back on leaving it. The originals are never written
    to, so autograd, which may have saved them for a backward pass, sees no in-place change.
    """
    saved = [
        (layer, name, buffer)
        for layer in module.modules()
        for name in _RUNNING_STATS
        if isinstance(buffer := getattr(layer, name, None), torch.Tensor)
    ]
    for layer, name, buffer in saved:
        setattr(layer, name, buffer.detach().clone())  # a registered buffer stays one
    try:
        yield
    finally:
        for layer, name, buffer in saved:
            setattr(layer, name, buffer)


class UpStage(nn.Module):
    """Upsample to the skip's size, concatenate the skip, conv block.

    (B, C_in, *s) [+ skip (B, C_skip, *S)] -> (B, C_out, *S). ``scale`` (per-dim integer factor
    S/s) selects a transposed conv with kernel = stride = scale; ``None`` (non-integer factors)
    selects linear interpolation followed by a 1x1 conv. Should the sizes still differ at run
    time, the upsampled map is interpolated to the skip's size.
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        scale: tuple[int, ...] | None,
        spatial_dims: int,
        convs: int,
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.interpolate_first = scale is None
        if scale is None:
            self.up = CONV[spatial_dims](in_channels, out_channels, 1)
        else:
            self.up = CONV_TRANSPOSE[spatial_dims](in_channels, out_channels, scale, stride=scale)
        self.block = conv_block(out_channels + skip_channels, out_channels, convs, spatial_dims)

    def _resize(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if tuple(x.shape[2:]) == tuple(size):
            return x
        return F.interpolate(x, size=tuple(size), mode=_LINEAR_MODE[self.spatial_dims])

    def forward(
        self, x: torch.Tensor, size: Sequence[int], skip: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, C_in, *s), target spatial ``size`` S, optional skip (B, C_skip, *S)."""
        if self.interpolate_first:
            x = self.up(self._resize(x, size))
        else:
            x = self._resize(self.up(x), size)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.block(x)


def _scale(coarse: tuple[float, ...], fine: tuple[float, ...]) -> tuple[int, ...] | None:
    """Integer per-dim factor from a map of stride ``coarse`` to one of stride ``fine``."""
    factors = [c / f for c, f in zip(coarse, fine)]
    rounded = tuple(round(f) for f in factors)
    if all(r >= 1 and abs(f - r) < 1e-6 for f, r in zip(factors, rounded)):
        return rounded
    return None


class ReconstructionDecoder(nn.Module):
    """U-Net-style decoder from a bottleneck and encoder skips back to input resolution.

    ``geometry`` lists the bottleneck first, then the skips deepest first. Stage ``i``
    upsamples to skip ``i``'s size with that skip's channel count, concatenates it and applies a
    conv block; if the shallowest skip is not at input resolution, a last stage without skip
    upsamples to it. ``head`` (1x1 conv) gives (B, out_channels, *input size).
    """

    def __init__(
        self,
        geometry: Sequence[TapGeometry],
        out_channels: int,
        spatial_dims: int,
        convs_per_block: int = 2,
    ) -> None:
        super().__init__()
        if len(geometry) < 1:
            raise MTKDError("the reconstruction decoder needs at least a bottleneck tap")
        self.stages = nn.ModuleList()
        current = geometry[0]
        for skip in geometry[1:]:
            scale = _scale(current.stride, skip.stride)
            self.stages.append(
                UpStage(
                    current.channels,
                    skip.channels,
                    skip.channels,
                    scale,
                    spatial_dims,
                    convs_per_block,
                )
            )
            current = skip
        unit = (1.0,) * spatial_dims
        self.final: UpStage | None = None
        if any(abs(s - 1.0) > 1e-6 for s in current.stride):
            width = current.channels
            scale = _scale(current.stride, unit)
            self.final = UpStage(width, 0, width, scale, spatial_dims, convs_per_block)
        self.head = CONV[spatial_dims](current.channels, out_channels, 1)

    def forward(
        self, bottleneck: torch.Tensor, skips: Sequence[torch.Tensor], size: Sequence[int]
    ) -> torch.Tensor:
        """bottleneck (B, C_b, *s_b), skips deepest first (B, C_i, *s_i) -> (B, out, *size)."""
        x = bottleneck
        for stage, skip in zip(self.stages, skips):
            x = stage(x, skip.shape[2:], skip)
        if self.final is not None:
            x = self.final(x, size)
        return self.head(x)


@torch.no_grad()
def probe_taps(
    model: nn.Module,
    names: Sequence[str],
    in_channels: int,
    spatial_dims: int,
    size_multiple: int = 1,
) -> list[TapGeometry]:
    """Run one small dummy input through ``model`` (eval mode) and measure the taps ``names``.

    The dummy input is (1, in_channels, 2m, m[, m]) with m the smallest multiple of
    ``size_multiple`` that is at least 8, so the deepest map keeps at least 2 voxels.
    """
    side = size_multiple * math.ceil(8 / size_multiple)
    spatial = (2 * side,) + (side,) * (spatial_dims - 1)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dummy = torch.zeros((1, in_channels) + spatial, device=device)
    was_training = model.training
    model.eval()
    try:
        with FeatureRecorder(model, names) as recorder:
            model(dummy)
    except MTKDError:
        raise
    except Exception as err:
        raise MTKDError(
            f"could not probe {type(model).__name__} with a dummy input of shape "
            f"{tuple(dummy.shape)}: {err}"
        ) from err
    finally:
        model.train(was_training)
    if recorder.missing():
        raise MTKDError(f"taps {recorder.missing()} of {type(model).__name__} never ran")
    geometry = []
    for name in names:
        feature = recorder.features[name]
        if feature.dim() != spatial_dims + 2:
            raise MTKDError(
                f"tap '{name}' gives shape {tuple(feature.shape)}, not (B, C) + "
                f"{spatial_dims} spatial sizes"
            )
        stride = tuple(s / f for s, f in zip(spatial, feature.shape[2:]))
        geometry.append(TapGeometry(name, int(feature.shape[1]), stride))
    return geometry


class MultiTaskNet(nn.Module):
    """A segmentation backbone with a second, reconstruction decoder on its encoder.

    ``forward`` is the backbone's own segmentation, so the teacher can be used as a plain
    segmenter; taps keep the backbone's names under ``backbone.`` (e.g. ``backbone.enc2``).

    Args:
        backbone: segmentation network, (B, in_channels, *S) -> (B, out, *S).
        encoder_taps: module names of its encoder features, shallow to deep.
        bottleneck_tap: module name of its bottleneck feature.
        in_channels: input channels, also the reconstruction's channels.
        spatial_dims: 2 or 3.
        size_multiple: every spatial size of the input must divide by it.
        convs_per_block: conv-BN-ReLU repetitions per reconstruction decoder block.
        reconstruction_mode: "masked" (reconstruct the input from a patch-masked copy) or
            "unmasked" (the thesis' original: reconstruct the input from itself).
        mask_ratio: share of patches masked in "masked" mode.
        mask_patch: patch side in voxels in "masked" mode.
    """

    def __init__(
        self,
        backbone: nn.Module,
        encoder_taps: Sequence[str],
        bottleneck_tap: str,
        in_channels: int,
        spatial_dims: int,
        size_multiple: int = 1,
        convs_per_block: int = 2,
        reconstruction_mode: str = "masked",
        mask_ratio: float = 0.5,
        mask_patch: int | Sequence[int] = 8,
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        self.backbone = backbone
        self.encoder_taps = tuple(encoder_taps)
        self.bottleneck_tap = bottleneck_tap
        self.in_channels = in_channels
        self.spatial_dims = spatial_dims
        self.size_multiple = size_multiple
        self.reconstruction_mode = reconstruction_mode
        self.mask_ratio = mask_ratio
        self.mask_patch = mask_patch
        names = [bottleneck_tap, *reversed(self.encoder_taps)]
        self.tap_geometry = probe_taps(backbone, names, in_channels, spatial_dims, size_multiple)
        self.recon_decoder = ReconstructionDecoder(
            self.tap_geometry, in_channels, spatial_dims, convs_per_block
        )

    @property
    def reconstruction_mode(self) -> str:
        return self._reconstruction_mode

    @reconstruction_mode.setter
    def reconstruction_mode(self, mode: str) -> None:
        if mode not in RECONSTRUCTION_MODES:
            raise MTKDError(
                f"reconstruction_mode must be one of {RECONSTRUCTION_MODES}, not {mode!r}"
            )
        self._reconstruction_mode = mode

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != self.spatial_dims + 2:
            raise MTKDError(
                f"the teacher ({self.spatial_dims}-D) expects input (B, C) + {self.spatial_dims} "
                f"spatial sizes, got shape {tuple(x.shape)}"
            )
        require_divisible(x, self.size_multiple, f"{type(self.backbone).__name__} teacher")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, *S) -> segmentation logits (B, out, *S)."""
        self._check(x)
        return self.backbone(x)

    def forward_tasks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One backbone pass: (B, in, *S) -> (seg logits (B, out, *S), recon (B, in, *S))."""
        self._check(x)
        names = [self.bottleneck_tap, *reversed(self.encoder_taps)]
        with FeatureRecorder(self.backbone, names) as recorder:
            seg = self.backbone(x)
        if recorder.missing():
            raise MTKDError(f"taps {recorder.missing()} of the teacher's backbone did not run")
        features = [recorder.features[name] for name in names]
        recon = self.recon_decoder(features[0], features[1:], x.shape[2:])
        return seg, recon

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, *S) -> reconstruction (B, in, *S) (of whatever input it is given)."""
        return self.forward_tasks(x)[1]

    def mask_patches(
        self,
        x: torch.Tensor,
        ratio: float | None = None,
        patch: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`mask_patches` with this teacher's ``mask_ratio``/``mask_patch`` as defaults."""
        ratio = self.mask_ratio if ratio is None else ratio
        patch = self.mask_patch if patch is None else patch
        return mask_patches(x, ratio, patch, generator)

    def multitask_outputs(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Outputs for one training step: (seg logits, reconstruction, reconstruction target).

        "masked": the reconstruction comes from a patch-masked copy of ``x``, the segmentation
        from the clean ``x`` (two backbone passes; the clean pass runs last, so taps recorded
        from outside hold clean-input features). The masked pass leaves the backbone's running
        normalisation statistics as they were (:func:`frozen_running_stats`): they come from
        clean inputs only, the inputs the teacher sees when it segments; the reconstruction
        decoder, which only ever sees masked inputs, keeps its own. "unmasked": one pass on
        ``x``. The target is ``x`` in both modes.
        """
        seg, recon, _ = self._training_passes(x, generator)
        return seg, recon, x

    def multitask_losses(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        loss_on: str = "all",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(seg logits (B, out, *S), reconstruction loss (float32 scalar)) for one training
        step, the passes as in :meth:`multitask_outputs`.

        ``loss_on``: "all", the MSE over the whole image; "masked", over the masked patches
        only (MAE-style; needs reconstruction_mode "masked"). See :func:`reconstruction_loss`.
        """
        if loss_on not in RECONSTRUCTION_LOSS_ON:
            raise MTKDError(
                f"reconstruction loss_on must be one of {RECONSTRUCTION_LOSS_ON}, not {loss_on!r}"
            )
        if loss_on == "masked" and self.reconstruction_mode != "masked":
            raise MTKDError(
                "a reconstruction loss on the masked patches needs reconstruction_mode "
                f"'masked', not {self.reconstruction_mode!r}"
            )
        seg, recon, mask = self._training_passes(x, generator)
        return seg, reconstruction_loss(recon, x, mask if loss_on == "masked" else None)

    def _training_passes(
        self, x: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(seg logits, reconstruction, mask (B, 1, *S) bool or None when unmasked)."""
        if self.reconstruction_mode != "masked":
            seg, recon = self.forward_tasks(x)
            return seg, recon, None
        masked, mask = self.mask_patches(x, generator=generator)
        with frozen_running_stats(self.backbone):
            recon = self.reconstruct(masked)
        seg = self.forward(x)
        return seg, recon, mask
