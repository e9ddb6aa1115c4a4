"""Tests of mtkd.distill: losses, spec, connectors and the Distiller (CPU, tiny MONAI nets)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet, SegResNetDS, UNet

from mtkd.distill.connectors import Connector, check_alignable
from mtkd.distill.distiller import Distiller, DistillOutput
from mtkd.distill.losses import (
    FEATURE_LOSSES,
    OUTPUT_LOSSES,
    cosine_loss,
    get_feature_loss,
    infonce_loss,
    mse_loss,
    pmd_loss,
)
from mtkd.distill.spec import OutputTerm, TapPair
from mtkd.errors import MTKDError


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------- InfoNCE


def _infonce_by_hand(s: torch.Tensor, t: torch.Tensor, tau: float) -> float:
    """The paper's formula written out with Python floats."""
    b = s.shape[0]
    zs = [v.double().flatten().tolist() for v in s]
    zt = [v.double().flatten().tolist() for v in t]
    zs = [[x / math.sqrt(sum(y * y for y in v)) for x in v] for v in zs]
    zt = [[x / math.sqrt(sum(y * y for y in v)) for x in v] for v in zt]
    total = 0.0
    for i in range(b):
        logits = [sum(a * c for a, c in zip(zs[i], zt[j])) / tau for j in range(b)]
        total += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    return total / b


def test_infonce_matches_hand_computation() -> None:
    s, t = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    for tau in (0.4, 1.0):
        got = infonce_loss(s, t, temperature=tau).item()
        assert got == pytest.approx(_infonce_by_hand(s, t, tau), rel=1e-5)


def test_infonce_default_temperature_is_04() -> None:
    s, t = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    assert infonce_loss(s, t).item() == pytest.approx(_infonce_by_hand(s, t, 0.4), rel=1e-5)


def test_infonce_low_for_identical_features() -> None:
    s = torch.randn(8, 16, 4, 4)
    same = infonce_loss(s, s.clone()).item()
    other = infonce_loss(s, torch.randn(8, 16, 4, 4)).item()
    assert same < other - 1.0
    assert other == pytest.approx(math.log(8), abs=0.5)


def test_infonce_last_smaller_batch() -> None:
    s, t = torch.randn(4, 4, 3, 3), torch.randn(4, 4, 3, 3)
    full = infonce_loss(s, t)
    last = infonce_loss(s[:3], t[:3])
    assert torch.isfinite(full) and torch.isfinite(last)
    assert last.item() == pytest.approx(_infonce_by_hand(s[:3], t[:3], 0.4), rel=1e-5)


def test_infonce_batch_of_one_is_an_error() -> None:
    with pytest.raises(MTKDError, match="at least 2 images"):
        infonce_loss(torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3))


def test_infonce_float32_under_autocast() -> None:
    s = torch.randn(4, 8, 4, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = infonce_loss(s.bfloat16(), torch.randn(4, 8, 4, 4).bfloat16())
    assert loss.dtype == torch.float32
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_infonce_shape_mismatch() -> None:
    with pytest.raises(MTKDError, match="same shape"):
        infonce_loss(torch.randn(2, 4, 3, 3), torch.randn(2, 5, 3, 3))


# ---------------------------------------------------------------- mse / cosine


def test_mse_loss() -> None:
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert mse_loss(a, b).item() == pytest.approx(((a - b) ** 2).mean().item(), rel=1e-6)
    assert mse_loss(a, a).item() == 0.0


def test_cosine_loss() -> None:
    a = torch.randn(2, 3, 4, 4, 4)
    assert cosine_loss(a, 5 * a).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_loss(a, -a).item() == pytest.approx(2.0, abs=1e-6)
    b = torch.randn(2, 3, 4, 4, 4)
    dots = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    assert cosine_loss(a, b).item() == pytest.approx((1 - dots).mean().item(), rel=1e-5)
    with pytest.raises(MTKDError):
        cosine_loss(a, b[:, :2])


# ---------------------------------------------------------------- PMD


def _bernoulli_kl_by_hand(s: torch.Tensor, t: torch.Tensor, temp: float) -> float:
    p, q = torch.sigmoid(t.double() / temp), torch.sigmoid(s.double() / temp)
    kl = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    return (kl.mean() * temp**2).item()


def _softmax_kl_by_hand(s: torch.Tensor, t: torch.Tensor, temp: float) -> float:
    p, q = torch.softmax(t.double() / temp, 1), torch.softmax(s.double() / temp, 1)
    return ((p * torch.log(p / q)).sum(1).mean() * temp**2).item()


@pytest.mark.parametrize("channels", [1, 3])
def test_pmd_nonzero_with_gradient(channels: int) -> None:
    s = torch.randn(2, channels, 8, 8, requires_grad=True)
    t = (3 * torch.randn(2, channels, 8, 8)).requires_grad_(True)
    loss = pmd_loss(s, t, temperature=4.0)
    by_hand = (_bernoulli_kl_by_hand if channels == 1 else _softmax_kl_by_hand)(s, t, 4.0)
    assert loss.item() > 1e-3
    assert loss.item() == pytest.approx(by_hand, rel=1e-4)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None  # the teacher is detached


@pytest.mark.parametrize("channels", [1, 4])
def test_pmd_zero_when_student_equals_teacher(channels: int) -> None:
    z = 5 * torch.randn(2, channels, 4, 4, 4)
    assert abs(pmd_loss(z, z.clone()).item()) < 1e-5


def test_pmd_stable_for_large_logits() -> None:
    s = torch.tensor([[[-200.0, 200.0]]])
    t = torch.tensor([[[200.0, -200.0]]])
    assert torch.isfinite(pmd_loss(s, t, temperature=1.0))


def test_pmd_resizes_teacher_and_checks_channels() -> None:
    s = torch.randn(2, 2, 8, 8, requires_grad=True)
    assert torch.isfinite(pmd_loss(s, torch.randn(2, 2, 16, 16)))
    with pytest.raises(MTKDError, match="output channels"):
        pmd_loss(s, torch.randn(2, 3, 8, 8))


# ---------------------------------------------------------------- spec


def test_spec_round_trip_and_defaults() -> None:
    pair = TapPair.from_dict({"student": "down_1", "teacher": "down_2", "name": "E-E"})
    assert (pair.loss, pair.weight, pair.temperature) == ("infonce", 0.1, 0.4)
    assert TapPair.from_dict(pair.to_dict()) == pair
    term = OutputTerm()
    assert (term.loss, term.weight, term.temperature) == ("pmd", 0.2, 4.0)
    assert OutputTerm.from_dict(term.to_dict()) == term
    assert set(FEATURE_LOSSES) == {"infonce", "mse", "cosine", "supcon"}
    assert set(OUTPUT_LOSSES) == {"pmd", "cwd", "dist"}


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"student": "a", "teacher": "b", "loss": "hinge"}, "infonce"),
        ({"student": "a", "teacher": "b", "weight": -0.1}, "weight"),
        ({"student": "a", "teacher": "b", "temperature": 0}, "temperature"),
        ({"student": "a", "teacher": "b", "colour": 1}, "colour"),
        ({"student": "a"}, "teacher"),
        ({"student": "a", "teacher": "b", "name": "x.y"}, "name"),
    ],
)
def test_tap_pair_validation(data: dict, match: str) -> None:
    with pytest.raises(MTKDError, match=match):
        TapPair.from_dict(data)


def test_output_term_validation() -> None:
    with pytest.raises(MTKDError, match="pmd"):
        OutputTerm(loss="kl")
    with pytest.raises(MTKDError, match="temperature"):
        OutputTerm(temperature=-1.0)
    with pytest.raises(MTKDError, match="valid"):
        get_feature_loss("nope")


# ---------------------------------------------------------------- connectors


def test_connector_2d_upsamples_teacher() -> None:
    conn = Connector(4, 16, spatial_dims=2)
    s, t = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 4, 4)
    ps, at = conn(s, t)
    assert ps.shape == at.shape == (2, 16, 8, 8)
    assert conn.proj.weight.shape == (16, 4, 1, 1)
    expected = F.interpolate(t, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(at, expected)


def test_connector_3d_shrinks_teacher() -> None:
    conn = Connector(4, 8, spatial_dims=3)
    s, t = torch.randn(2, 4, 4, 4, 2), torch.randn(2, 8, 8, 8, 4)
    ps, at = conn(s, t)
    assert ps.shape == at.shape == (2, 8, 4, 4, 2)
    assert isinstance(conn.proj, torch.nn.Conv3d)
    assert torch.allclose(at, F.adaptive_avg_pool3d(t, (4, 4, 2)))
    assert conn(s, t[..., :4, :4, :2])[1].shape == (2, 8, 4, 4, 2)  # same size: unchanged


def test_check_alignable() -> None:
    pair = TapPair("enc.2", "encoder.layer2")
    check_alignable((2, 4, 16, 16), (2, 8, 8, 8), pair)
    check_alignable((2, 4, 25, 24), (2, 8, 12, 12), pair)  # rounding of odd sizes
    check_alignable((2, 4, 8, 8, 4), (2, 8, 16, 16, 8), pair)
    for s, t, why in [
        ((2, 4, 16, 16), (2, 8, 8, 32), "scale"),
        ((2, 4, 16, 16), (2, 8, 16, 16, 16), "rank"),
        ((2, 4, 16, 16), (3, 8, 16, 16), "batch"),
    ]:
        with pytest.raises(MTKDError, match=why) as info:
            check_alignable(s, t, pair)
        assert "enc.2" in str(info.value) and "encoder.layer2" in str(info.value)


# ---------------------------------------------------------------- Distiller

X2D = torch.randn(4, 1, 32, 32)


def _teacher_2d() -> BasicUNet:
    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(8, 8, 16, 16, 32, 8))


def _student_2d() -> UNet:
    return UNet(2, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=0)


PAIRS_2D = [
    # student UNet taps: encoder (16x16), bottleneck (8x8), last decoder (16x16)
    TapPair("model.0", "down_1", name="E-E", weight=0.1),
    TapPair("model.1.submodule.1.submodule", "down_4", name="B-B", weight=0.2),
    TapPair("model.1.submodule.2", "upcat_1", name="D-D", weight=0.1, loss="mse"),
]


def _distiller_2d() -> Distiller:
    return Distiller(_student_2d(), _teacher_2d(), PAIRS_2D, OutputTerm(), X2D[:1])


def test_distiller_terms_are_nonzero_and_reach_the_student() -> None:
    distiller = _distiller_2d()
    out = distiller(X2D)
    assert isinstance(out, DistillOutput)
    assert set(out.terms) == {"E-E", "B-B", "D-D", "pmd"}
    assert out.student_logits.shape == out.teacher_logits.shape == (4, 2, 32, 32)
    weighted = 0.1 * out.terms["E-E"] + 0.2 * out.terms["B-B"] + 0.1 * out.terms["D-D"]
    weighted = weighted + 0.2 * out.terms["pmd"]
    assert torch.allclose(out.loss, weighted)
    for name, term in out.terms.items():
        assert term.ndim == 0 and term.item() > 1e-6, name
        distiller.zero_grad(set_to_none=True)
        term.backward(retain_graph=True)
        grads = [p.grad for p in distiller.student.parameters() if p.grad is not None]
        assert grads and sum(g.abs().sum() for g in grads) > 0, name
        if name != "pmd":
            assert distiller.connectors[name].proj.weight.grad.abs().sum() > 0, name


def test_distiller_teacher_frozen_and_connectors_learn() -> None:
    teacher = _teacher_2d().train()
    distiller = Distiller(_student_2d(), teacher, PAIRS_2D, OutputTerm(), X2D[:1])
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    conn_before = {k: v.clone() for k, v in distiller.connector_state_dict().items()}
    conn_params = [id(p) for p in distiller.connectors.parameters()]
    assert set(conn_params) <= {id(p) for p in distiller.trainable_parameters()}
    student_before = [p.detach().clone() for p in distiller.student.parameters()]
    optimiser = torch.optim.Adam(distiller.trainable_parameters(), lr=1e-2)
    distiller.train()
    for _ in range(3):
        optimiser.zero_grad()
        distiller(X2D).loss.backward()
        assert all(p.grad is None for p in teacher.parameters())
        optimiser.step()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    assert [id(p) for p in distiller.connectors.parameters()] == conn_params  # created once
    for key, value in distiller.connector_state_dict().items():
        if key.endswith("weight"):
            assert not torch.allclose(value, conn_before[key]), f"connector {key} did not learn"
    after = list(distiller.student.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, student_before))


def test_distiller_state_dict_and_parameters() -> None:
    distiller = _distiller_2d()
    keys = set(distiller.state_dict())
    assert {"connectors.E-E.proj.weight", "connectors.B-B.proj.weight"} <= keys
    assert all(k.startswith(("student.", "connectors.")) for k in keys)
    assert len(keys) == len(distiller.student.state_dict()) + len(distiller.connector_state_dict())
    teacher_ids = {id(p) for p in distiller.teacher.parameters()}
    assert not teacher_ids & {id(p) for p in distiller.parameters()}
    trainable = distiller.trainable_parameters()
    n_student = len(list(distiller.student.parameters()))
    assert len(trainable) == n_student + len(list(distiller.connectors.parameters()))
    assert not any(k.startswith("connectors") for k in distiller.student.state_dict())
    assert isinstance(distiller.student, UNet)
    distiller.train()
    assert distiller.student.training and not distiller.teacher.training
    distiller.double()  # moving the distiller moves the teacher too
    assert next(distiller.teacher.parameters()).dtype == torch.float64
    fresh = _distiller_2d()
    fresh.load_connector_state_dict(distiller.connector_state_dict())


def test_distiller_batch_three_after_four() -> None:
    distiller = _distiller_2d()
    full = distiller(X2D)
    last = distiller(X2D[:3])
    assert torch.isfinite(full.loss) and torch.isfinite(last.loss)
    assert last.student_logits.shape[0] == 3
    with pytest.raises(MTKDError, match="at least 2"):
        distiller(X2D[:1])


def test_distiller_without_terms_and_zero_weights() -> None:
    distiller = Distiller(_student_2d(), _teacher_2d(), [], None, X2D[:1])
    out = distiller(X2D)
    assert out.terms == {} and out.loss.item() == 0.0
    zero = [TapPair(p.student, p.teacher, loss=p.loss, weight=0.0, name=p.name) for p in PAIRS_2D]
    out = Distiller(_student_2d(), _teacher_2d(), zero, OutputTerm(weight=0.0), X2D[:1])(X2D)
    assert out.loss.item() == 0.0 and all(t.item() > 0 for t in out.terms.values())


def test_distiller_unknown_tap() -> None:
    for pair, who in [
        (TapPair("model.9", "down_1"), "student"),
        (TapPair("model.0", "down_9"), "teacher"),
    ]:
        with pytest.raises(MTKDError, match=f"{who}: unknown tap") as info:
            Distiller(_student_2d(), _teacher_2d(), [pair], None, X2D[:1])
        assert "pair0" in str(info.value)


def test_distiller_output_channel_mismatch() -> None:
    teacher = BasicUNet(spatial_dims=2, in_channels=1, out_channels=3, features=(4,) * 6)
    with pytest.raises(MTKDError, match="output channels"):
        Distiller(_student_2d(), teacher, [], OutputTerm(), X2D[:1])
    Distiller(_student_2d(), teacher, [TapPair("model.0", "down_1")], None, X2D[:1])


def test_distiller_rejects_non_uniform_scale() -> None:
    # A student whose bottleneck is anisotropic relative to the teacher's (pool only along W).
    student = UNet(2, 1, 2, channels=(4, 8), strides=((1, 2),), num_res_units=0)
    with pytest.raises(MTKDError, match="scale") as info:
        Distiller(student, _teacher_2d(), [TapPair("model.0", "down_1")], None, X2D[:1])
    assert "model.0" in str(info.value) and "down_1" in str(info.value)


def test_distiller_deep_supervision_list_output() -> None:
    student = SegResNetDS(
        spatial_dims=2,
        init_filters=4,
        in_channels=1,
        out_channels=2,
        blocks_down=(1, 1, 1),
        dsdepth=2,
    )
    pair = TapPair("encoder.layers.1.blocks", "down_1", loss="cosine")
    distiller = Distiller(student, _teacher_2d(), [pair], OutputTerm(), X2D[:1]).train()
    out = distiller(X2D)
    assert isinstance(out.student_output, list)
    assert out.student_logits.shape == (4, 2, 32, 32)
    out.loss.backward()
    assert distiller.connectors["pair0"].proj.weight.grad.abs().sum() > 0


def test_distiller_sigmoid_output_3d() -> None:
    teacher = BasicUNet(spatial_dims=3, in_channels=1, out_channels=1, features=(4, 4, 8, 8, 8, 4))
    student = UNet(3, 1, 1, channels=(2, 4), strides=(2,), num_res_units=0)
    x = torch.randn(2, 1, 32, 32, 32)
    pairs = [TapPair("model.1.submodule", "down_2", name="B-B")]
    distiller = Distiller(student, teacher, pairs, OutputTerm(), x[:1])
    out = distiller(x)
    assert out.terms["pmd"].item() > 0 and out.terms["B-B"].item() > 0
    out.loss.backward()
    assert all(p.grad is not None for p in distiller.student.parameters())
