"""Networks: the thesis U-Nets, the registry of networks and their taps, the multi-task teacher."""

from __future__ import annotations

import pytest
import torch
from helpers import NETWORK_CASES, network_case_id
from torch import nn
from torch.nn import functional as F

from mtkd.errors import MTKDError
from mtkd.models import (
    FeatureRecorder,
    MultiTaskNet,
    ThesisUNet,
    available_networks,
    build_network,
    build_teacher,
    count_parameters,
    mask_patches,
    network_info,
)


# (network, params, input shape): tiny configurations, 2-D and 3-D where the network supports it.
def _grad_norm(module: nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


# --- thesis U-Nets ----------------------------------------------------------------------------


def test_student_parameter_counts_match_the_thesis() -> None:
    assert count_parameters(build_network("thesis_s1")) == 57_297
    assert count_parameters(build_network("thesis_s2")) == 227_233
    s1 = ThesisUNet(3, 1, channels=(16, 32), bottleneck=64, convs_per_block=1)
    assert count_parameters(s1) == 57_297


def test_thesis_unet_module_names_and_shapes() -> None:
    net = ThesisUNet(3, 2, channels=(4, 8, 16), bottleneck=32, convs_per_block=2)
    names = {n for n, _ in net.named_children()}
    levels = ("1", "2", "3")
    expected = {f"{part}{i}" for part in ("enc", "up", "dec") for i in levels}
    assert names == expected | {"bottleneck", "head"}
    with FeatureRecorder(net, ["enc1", "enc3", "bottleneck", "dec1", "dec3"]) as rec:
        out = net(torch.randn(2, 3, 32, 24))
    assert out.shape == (2, 2, 32, 24)
    assert rec.features["enc1"].shape == (2, 4, 32, 24)
    assert rec.features["enc3"].shape == (2, 16, 8, 6)
    assert rec.features["bottleneck"].shape == (2, 32, 4, 3)
    assert rec.features["dec1"].shape == (2, 16, 8, 6)
    assert rec.features["dec3"].shape == (2, 4, 32, 24)


def test_t1_teacher_has_one_shared_encoder_and_two_decoders() -> None:
    teacher = build_teacher("thesis_t1_backbone", reconstruction="unmasked")
    assert isinstance(teacher, MultiTaskNet)
    total = count_parameters(teacher)
    assert 40e6 <= total <= 46e6, total
    # The reconstruction decoder mirrors the segmentation decoder of the backbone.
    backbone_decoder = sum(
        count_parameters(m) for n, m in teacher.backbone.named_children() if n[:2] in ("up", "de")
    )
    recon_head = 64 * 3 + 3  # 1x1 conv, 64 -> 3 channels
    assert count_parameters(teacher.recon_decoder) == backbone_decoder + recon_head
    seg, recon = teacher.forward_tasks(torch.randn(1, 3, 32, 32))
    assert seg.shape == (1, 1, 32, 32) and recon.shape == (1, 3, 32, 32)


def test_non_divisible_input_raises() -> None:
    net = build_network("thesis_s1")
    with pytest.raises(MTKDError, match=r"divisible by 4.*\(18, 16\)"):
        net(torch.randn(1, 3, 18, 16))
    teacher = build_teacher("unet", spatial_dims=2, channels=(4, 8, 16))
    with pytest.raises(MTKDError, match=r"divisible by 4.*\(20, 18\)"):
        teacher.forward_tasks(torch.randn(1, 1, 20, 18))
    with pytest.raises(MTKDError, match="spatial sizes"):
        net(torch.randn(1, 3, 16, 16, 16))


# --- registry -------------------------------------------------------------------------------


def test_every_registered_network_has_a_test_case() -> None:
    assert sorted({c[0] for c in NETWORK_CASES}) == available_networks()


@pytest.mark.parametrize("case", NETWORK_CASES, ids=network_case_id)
def test_registry_network_runs_and_its_taps_fire(case: tuple) -> None:
    name, params, shape = case
    torch.manual_seed(0)
    info = network_info(name, **params)
    net = build_network(name, **params)
    assert all(s % info.size_multiple == 0 for s in shape[2:])
    assert len(info.taps) == len(set(info.taps)) >= 3
    with FeatureRecorder(net, info.taps) as rec:
        out = net(torch.randn(shape))
    assert rec.missing() == []
    out_channels = info.params["out_channels"]
    assert tuple(out.shape) == (shape[0], out_channels, *shape[2:])
    rank = len(shape)
    sizes = []
    for tap in info.taps:
        feature = rec.features[tap]
        assert feature.dim() == rank, (tap, feature.shape)
        assert feature.shape[0] == shape[0]
        sizes.append(feature.shape[2:].numel())
    # Encoder taps shallow to deep, bottleneck deepest; the last decoder feature is shallow again.
    encoder_and_bottleneck = sizes[:-1]
    assert encoder_and_bottleneck == sorted(encoder_and_bottleneck, reverse=True)
    assert sizes[-1] > sizes[-2]


def test_unet_taps_follow_its_channels() -> None:
    info = network_info("unet", channels=(8, 16, 32))
    assert info.encoder_taps == ["model.0", "model.1.submodule.0"]
    assert info.bottleneck_tap == "model.1.submodule.1.submodule"
    assert info.decoder_tap == "model.1.submodule.2"
    assert info.size_multiple == 4
    default = network_info("unet")
    assert len(default.encoder_taps) == 4 and default.size_multiple == 16


def test_unknown_network_or_parameter_raises() -> None:
    with pytest.raises(MTKDError, match="thesis_s1.*unet|unet.*thesis_s1"):
        build_network("resnet_unet")
    with pytest.raises(MTKDError, match="chanels.*channels="):
        build_network("unet", chanels=(4, 8))
    with pytest.raises(MTKDError, match="bottleneck"):
        build_network("thesis_s1", bottleneck=32)
    with pytest.raises(MTKDError, match="spatial_dims"):
        build_network("unet", spatial_dims=4)
    with pytest.raises(MTKDError, match="swinunetr"):
        build_network("swinunetr", feature_size=10)
    with pytest.raises(MTKDError, match="strides"):
        build_network("unet", channels=(4, 8, 16), strides=(2,))
    with pytest.raises(MTKDError, match="reconstruction"):
        build_teacher("thesis_s1", reconstruction="denoise")


def test_count_parameters_trainable_only() -> None:
    net = build_network("thesis_s1")
    for p in net.enc1.parameters():
        p.requires_grad_(False)
    frozen = count_parameters(net.enc1)
    assert count_parameters(net, trainable_only=True) == 57_297 - frozen


# --- multi-task teacher ---------------------------------------------------------------------

TEACHERS = [
    ("thesis_unet", {"channels": (4, 8), "bottleneck": 16}, (2, 3, 16, 16)),
    ("unet", {"spatial_dims": 2, "channels": (4, 8, 16)}, (2, 1, 16, 16)),
    ("basic_unet", {"spatial_dims": 2, "features": (4, 4, 8, 8, 16, 4)}, (2, 1, 32, 32)),
    ("segresnet", {"blocks_down": (1, 1, 1), "in_channels": 2}, (2, 2, 16, 16, 16)),
    ("dynunet", {"depth": 2, "filters": (4, 8, 16)}, (2, 1, 8, 8, 8)),
]


@pytest.mark.parametrize("case", TEACHERS, ids=network_case_id)
def test_multitask_shapes_and_tap_names(case: tuple) -> None:
    name, params, shape = case
    teacher = build_teacher(name, **params)
    info = network_info(name, **params)
    x = torch.randn(shape)
    taps = [f"backbone.{tap}" for tap in info.taps]
    with FeatureRecorder(teacher, taps) as rec:
        seg = teacher(x)
    assert rec.missing() == []
    out_shape = (shape[0], info.params["out_channels"], *shape[2:])
    assert tuple(seg.shape) == out_shape
    seg2, recon = teacher.forward_tasks(x)
    assert tuple(seg2.shape) == out_shape
    assert recon.shape == x.shape
    assert teacher.reconstruct(x).shape == x.shape
    seg3, recon3, target = teacher.multitask_outputs(x)
    assert tuple(seg3.shape) == out_shape and recon3.shape == x.shape and target is x


@pytest.mark.parametrize("case", TEACHERS[:3], ids=network_case_id)
def test_reconstruction_gradient_reaches_shared_encoder_only(case: tuple) -> None:
    name, params, shape = case
    teacher = build_teacher(name, **params)
    info = network_info(name, **params)
    seg, recon, target = teacher.multitask_outputs(torch.randn(shape))
    F.mse_loss(recon, target).backward()
    assert _grad_norm(teacher.recon_decoder) > 0
    first_encoder = teacher.backbone.get_submodule(info.encoder_taps[0])
    assert _grad_norm(first_encoder) > 0
    assert _grad_norm(teacher.backbone.get_submodule(info.decoder_tap)) == 0
    teacher.zero_grad(set_to_none=True)
    seg, recon, target = teacher.multitask_outputs(torch.randn(shape))
    seg.mean().backward()
    assert _grad_norm(first_encoder) > 0
    assert _grad_norm(teacher.backbone.get_submodule(info.decoder_tap)) > 0
    assert _grad_norm(teacher.recon_decoder) == 0


def _count_backbone_passes(teacher: MultiTaskNet, x: torch.Tensor) -> int:
    calls = []
    handle = teacher.backbone.register_forward_hook(lambda *_: calls.append(1))
    try:
        teacher.multitask_outputs(x, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    return len(calls)


def test_masked_mode_reconstructs_from_masked_input_and_unmasked_in_one_pass() -> None:
    torch.manual_seed(0)
    teacher = build_teacher("thesis_unet", channels=(4, 8), bottleneck=16, mask_patch=4)
    teacher.eval()
    x = torch.randn(2, 3, 32, 32)
    assert teacher.reconstruction_mode == "masked"
    with torch.no_grad():
        seg, recon, target = teacher.multitask_outputs(x, torch.Generator().manual_seed(7))
        masked, mask = teacher.mask_patches(x, generator=torch.Generator().manual_seed(7))
        assert torch.allclose(recon, teacher.reconstruct(masked))
        assert not torch.allclose(recon, teacher.reconstruct(x))
        assert torch.allclose(seg, teacher(x))
    assert target is x
    assert _count_backbone_passes(teacher, x) == 2
    teacher.reconstruction_mode = "unmasked"
    with torch.no_grad():
        seg, recon, _ = teacher.multitask_outputs(x)
        assert torch.allclose(recon, teacher.reconstruct(x))
    assert _count_backbone_passes(teacher, x) == 1
    with pytest.raises(MTKDError):
        teacher.reconstruction_mode = "noisy"


def test_build_teacher_modes() -> None:
    plain = build_teacher("thesis_s1", reconstruction="none")
    assert isinstance(plain, ThesisUNet)
    unmasked = build_teacher("thesis_s1", reconstruction="unmasked")
    assert isinstance(unmasked, MultiTaskNet) and unmasked.reconstruction_mode == "unmasked"
    assert count_parameters(unmasked.backbone) == 57_297


# --- masking --------------------------------------------------------------------------------


def test_mask_patches_masks_the_requested_share_of_patches() -> None:
    x = torch.randn(4, 3, 64, 48) + 10.0  # no zero voxels before masking
    masked, mask = mask_patches(x, ratio=0.25, patch=8, generator=torch.Generator().manual_seed(1))
    assert mask.shape == (4, 1, 64, 48) and mask.dtype == torch.bool
    per_image = mask.float().mean(dim=(1, 2, 3))
    assert torch.allclose(per_image, torch.full((4,), 0.25))  # 12 of 48 patches each
    assert torch.equal(masked == 0, mask.expand_as(x))  # same mask on every channel
    assert torch.equal(masked[~mask.expand_as(x)], x[~mask.expand_as(x)])
    assert not torch.equal(mask[0], mask[1])  # each image draws its own patches
    patches = mask[:, 0].unfold(1, 8, 8).unfold(2, 8, 8)  # (B, 8, 6, 8, 8)
    assert torch.all(patches.all(dim=(-1, -2)) | ~patches.any(dim=(-1, -2)))  # whole patches
    again, _ = mask_patches(x, ratio=0.25, patch=8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(masked, again)


def test_mask_patches_3d_partial_patches_and_bounds() -> None:
    x = torch.ones(2, 1, 10, 16, 16)
    masked, mask = mask_patches(x, ratio=0.5, patch=(4, 8, 8))
    assert mask.shape == (2, 1, 10, 16, 16)
    assert abs(mask.float().mean().item() - 0.5) < 0.15
    assert torch.equal(mask_patches(x, ratio=0.0)[0], x)
    assert not mask_patches(x, ratio=1.0)[0].any()
    with pytest.raises(MTKDError, match="ratio"):
        mask_patches(x, ratio=1.5)
