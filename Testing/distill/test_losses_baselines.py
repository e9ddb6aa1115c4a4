"""Tests of the output-level baselines CWD (Shu et al. 2021) and DIST (Huang et al. 2022)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtkd.config import DistillConfig, OutputTermConfig
from mtkd.distill.losses import OUTPUT_LOSSES, cwd_loss, dist_loss, get_output_loss, pmd_loss
from mtkd.distill.presets import resolve_output_term
from mtkd.errors import MTKDError

LOSSES = {"cwd": cwd_loss, "dist": dist_loss}
SHAPES = [(2, 1, 6, 5), (2, 3, 6, 5), (2, 1, 3, 4, 5), (2, 3, 3, 4, 5)]  # 2-D/3-D, binary/multi


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("shape", SHAPES)
def test_zero_when_student_equals_teacher(name: str, shape: tuple[int, ...]) -> None:
    z = 2.0 * torch.randn(shape)
    loss = LOSSES[name](z, z.clone(), 2.0)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert abs(loss.item()) < 1e-6


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("shape", SHAPES)
def test_positive_with_gradient_to_student_only(name: str, shape: tuple[int, ...]) -> None:
    s = torch.randn(shape, requires_grad=True)
    t = (2.0 * torch.randn(shape)).requires_grad_(True)
    loss = LOSSES[name](s, t, 2.0)
    assert loss.item() > 0
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_teacher_at_another_size_is_resized(name: str) -> None:
    s, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 16, 16)
    resized = F.interpolate(t, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(LOSSES[name](s, t, 2.0), LOSSES[name](s, resized, 2.0), atol=1e-6)
    s3, t3 = torch.randn(1, 2, 4, 4, 4), torch.randn(1, 2, 8, 8, 8)
    resized3 = F.interpolate(t3, size=(4, 4, 4), mode="trilinear", align_corners=False)
    assert torch.allclose(LOSSES[name](s3, t3, 2.0), LOSSES[name](s3, resized3, 2.0), atol=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("temperature", [0.0, -1.0, math.nan, math.inf])
def test_invalid_temperature_raises(name: str, temperature: float) -> None:
    z = torch.randn(1, 2, 4, 4)
    with pytest.raises(MTKDError, match="temperature"):
        LOSSES[name](z, z, temperature)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_incomparable_logits_raise(name: str) -> None:
    with pytest.raises(MTKDError, match="channels"):
        LOSSES[name](torch.randn(1, 2, 4, 4), torch.randn(1, 3, 4, 4), 1.0)


def test_half_precision_inputs_give_float32() -> None:
    s, t = torch.randn(1, 3, 4, 4).half(), torch.randn(1, 3, 4, 4).half()
    for fn in LOSSES.values():
        assert fn(s, t, 2.0).dtype == torch.float32


# ---------------------------------------------------------------- CWD


def test_cwd_by_hand() -> None:
    s = torch.tensor([[[[0.0, 1.0], [2.0, -1.0]], [[0.5, 0.5], [-0.5, 3.0]]]])  # (1, 2, 2, 2)
    t = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]], [[-1.0, 2.0], [1.0, 0.0]]]])
    temperature = 2.0
    total = 0.0
    for c in range(2):
        zs = [v / temperature for v in s[0, c].flatten().tolist()]
        zt = [v / temperature for v in t[0, c].flatten().tolist()]
        qs = [math.exp(v) / sum(math.exp(w) for w in zs) for v in zs]
        qt = [math.exp(v) / sum(math.exp(w) for w in zt) for v in zt]
        total += sum(pt * math.log(pt / ps) for pt, ps in zip(qt, qs))
    expected = total / 2 * temperature**2
    assert cwd_loss(s, t, temperature).item() == pytest.approx(expected, rel=1e-5)


def test_cwd_ignores_a_per_channel_shift_that_pmd_sees() -> None:
    s, t = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)
    shift = 5.0 * torch.randn(2, 3, 1, 1)  # one constant per image and channel
    assert torch.allclose(cwd_loss(s + shift, t), cwd_loss(s, t), atol=1e-5)
    assert not torch.allclose(pmd_loss(s + shift, t), pmd_loss(s, t), atol=1e-3)
    # and the converse: a per-voxel shift across channels changes CWD but not PMD
    voxel = 5.0 * torch.randn(2, 1, 6, 6)
    assert torch.allclose(pmd_loss(s + voxel, t), pmd_loss(s, t), atol=1e-5)
    assert not torch.allclose(cwd_loss(s + voxel, t), cwd_loss(s, t), atol=1e-3)


def test_cwd_binary_is_spatial_softmax_of_the_single_channel() -> None:
    s, t = torch.randn(2, 1, 5, 5), torch.randn(2, 1, 5, 5)
    log_s = F.log_softmax(s.flatten(1) / 3.0, dim=1)
    log_t = F.log_softmax(t.flatten(1) / 3.0, dim=1)
    expected = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * 9.0
    assert torch.allclose(cwd_loss(s, t, 3.0), expected, atol=1e-6)


# ---------------------------------------------------------------- DIST


def _dist_by_corrcoef(s: torch.Tensor, t: torch.Tensor, temperature: float) -> float:
    """The DIST formula with torch.corrcoef, one correlation at a time, in float64."""

    def probs(z: torch.Tensor) -> torch.Tensor:
        z = z.double() / temperature
        if z.shape[1] == 1:
            p = torch.sigmoid(z)
            return torch.cat([1 - p, p], dim=1)
        return torch.softmax(z, dim=1)

    p_s, p_t = probs(s).flatten(2), probs(t).flatten(2)  # (B, C, N)
    b, c, n = p_s.shape
    inter = [
        1 - torch.corrcoef(torch.stack([p_s[i, :, j], p_t[i, :, j]]))[0, 1].item()
        for i in range(b)
        for j in range(n)
    ]
    intra = [
        1 - torch.corrcoef(torch.stack([p_s[:, k].flatten(), p_t[:, k].flatten()]))[0, 1].item()
        for k in range(c)
    ]
    return temperature**2 * (sum(inter) / len(inter) + sum(intra) / len(intra))


@pytest.mark.parametrize("shape", [(2, 3, 3, 2), (1, 4, 2, 2, 2), (2, 1, 3, 3)])
def test_dist_by_hand(shape: tuple[int, ...]) -> None:
    s, t = torch.randn(shape), 2.0 * torch.randn(shape)
    expected = _dist_by_corrcoef(s, t, 1.5)
    assert dist_loss(s, t, 1.5).item() == pytest.approx(expected, rel=1e-5)


def test_dist_weights_of_the_two_terms() -> None:
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    inter = dist_loss(s, t, 1.0, beta=1.0, gamma=0.0)
    intra = dist_loss(s, t, 1.0, beta=0.0, gamma=1.0)
    assert inter.item() > 0 and intra.item() > 0
    assert torch.allclose(dist_loss(s, t, 1.0), inter + intra, atol=1e-6)
    assert torch.allclose(dist_loss(s, t, 1.0, beta=2.0, gamma=0.5), 2 * inter + 0.5 * intra)


def test_dist_is_zero_for_an_affine_copy_of_the_teacher_while_pmd_is_not() -> None:
    # p_s = a * p_t + (1 - a) / C is a positive affine map of p_t, the same at every voxel and
    # class, so both Pearson correlations are 1: DIST matches relations, not values.
    temperature, a = 2.0, 0.3
    t = 3.0 * torch.randn(2, 4, 5, 5)
    p_t = torch.softmax(t / temperature, dim=1)
    s = temperature * torch.log(a * p_t + (1 - a) / 4)  # softmax(s / T) = a * p_t + (1 - a) / 4
    assert abs(dist_loss(s, t, temperature).item()) < 1e-5
    assert pmd_loss(s, t, temperature).item() > 1e-2
    assert cwd_loss(s, t, temperature).item() > 1e-2


def test_dist_binary_uses_two_class_probabilities() -> None:
    s, t = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    # sigmoid(z) == softmax([0, z]) over two classes
    two = lambda z: torch.cat([torch.zeros_like(z), z], dim=1)  # noqa: E731
    assert torch.allclose(dist_loss(s, t, 2.0), dist_loss(two(s), two(t), 2.0), atol=1e-6)


def test_dist_finite_for_a_uniform_student() -> None:
    s = torch.zeros(1, 3, 4, 4, requires_grad=True)  # constant probabilities everywhere
    loss = dist_loss(s, torch.randn(1, 3, 4, 4), 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


# ---------------------------------------------------------------- registry and config


def test_registered_and_accepted_by_the_distillation_config() -> None:
    assert {"pmd", "cwd", "dist"} <= OUTPUT_LOSSES
    assert get_output_loss("cwd") is cwd_loss and get_output_loss("dist") is dist_loss
    config = DistillConfig(teacher="t", output=OutputTermConfig(loss="cwd", temperature=4.0))
    term = resolve_output_term(config)
    assert term is not None and (term.loss, term.temperature) == ("cwd", 4.0)
    with pytest.raises(MTKDError, match="cwd"):
        resolve_output_term(DistillConfig(teacher="t", output=OutputTermConfig(loss="kl")))
