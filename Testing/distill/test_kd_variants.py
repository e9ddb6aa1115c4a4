"""Method variants of issue 15: InfoNCE without same-subject negatives, the teacher's masked
(MAE-style) reconstruction loss with BatchNorm statistics from clean inputs, and the output
baselines at their published settings (named presets)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet, UNet

from mtkd.config import DistillConfig, OutputTermConfig, RunConfig, TapPairConfig
from mtkd.distill.distiller import Distiller
from mtkd.distill.losses import get_output_loss, infonce_loss
from mtkd.distill.presets import (
    OUTPUT_PRESETS,
    PRESETS,
    feature_weights,
    resolve_output_term,
    resolve_terms,
)
from mtkd.distill.spec import TapPair
from mtkd.engine.seg_loss import SegmentationLoss
from mtkd.engine.step import TrainingStep
from mtkd.errors import MTKDError
from mtkd.models import build_teacher
from mtkd.models.multitask import frozen_running_stats, reconstruction_loss


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------- InfoNCE and subjects


def _unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def _infonce_by_hand(s: torch.Tensor, t: torch.Tensor, subjects: list[int], tau: float) -> float:
    """InfoNCE with Python floats: anchor i's softmax holds its positive t_i and the t_j of
    other subjects; anchors without such a j are left out of the mean."""
    zs = [_unit(v) for v in s.double().flatten(1).tolist()]
    zt = [_unit(v) for v in t.double().flatten(1).tolist()]
    losses = []
    for i, (a, subject) in enumerate(zip(zs, subjects)):
        sims = [sum(p * q for p, q in zip(a, k)) / tau for k in zt]
        negatives = [math.exp(x) for j, x in enumerate(sims) if subjects[j] != subject]
        if negatives:
            losses.append(-math.log(math.exp(sims[i]) / (math.exp(sims[i]) + sum(negatives))))
    return sum(losses) / len(losses) if losses else 0.0


def test_infonce_other_subjects_closed_form() -> None:
    # 4 images of 2 subjects; student = teacher = unit vectors (1,0), (0,1), (0,1), (1,0).
    # Each anchor's positive has similarity 1; of the other subject, one image has 1 and one 0:
    # loss = -log(e^a / (e^a + e^a + e^0)) = log(2 + e^-a), a = 1 / tau. The batch variant also
    # has the same-subject image: anchor 0 sees (0,1), similarity 0 -> log(2 + 2 e^-a).
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]).view(4, 2, 1, 1)
    tau = 0.5
    a = 1 / tau
    subject = torch.tensor([0, 0, 1, 1])
    got = infonce_loss(z, z.clone(), tau, subject)
    assert got.item() == pytest.approx(math.log(2 + math.exp(-a)), rel=1e-6)
    assert infonce_loss(z, z.clone(), tau).item() == pytest.approx(
        math.log(2 + 2 * math.exp(-a)), rel=1e-6
    )


@pytest.mark.parametrize("subjects", [[0, 0, 1, 1], [3, 3, 3, 7], [2, 1, 2, 1], [0, 1, 1, 1]])
def test_infonce_other_subjects_matches_hand_computation(subjects: list[int]) -> None:
    s, t = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    got = infonce_loss(s, t, 0.4, torch.tensor(subjects)).item()
    assert got == pytest.approx(_infonce_by_hand(s, t, subjects, 0.4), rel=1e-5)
    # and it is not the batch variant: the same-subject images are gone from the softmax
    assert abs(got - infonce_loss(s, t, 0.4).item()) > 1e-4


def test_infonce_all_subjects_differ_is_the_batch_variant() -> None:
    s, t = torch.randn(5, 4, 3, 3), torch.randn(5, 4, 3, 3)
    batch = infonce_loss(s, t, 0.3)
    for subject in (torch.arange(5), torch.tensor([9, 2, 4, 0, 7], dtype=torch.int32)):
        assert torch.allclose(infonce_loss(s, t, 0.3, subject), batch, atol=1e-6)


def test_infonce_one_subject_batch_is_zero_with_a_finite_gradient() -> None:
    s = torch.randn(3, 4, 2, 2, requires_grad=True)
    loss = infonce_loss(s, torch.randn(3, 4, 2, 2), 0.4, torch.tensor([5, 5, 5]))
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_infonce_other_subjects_gradient_is_finite() -> None:
    s = torch.randn(4, 3, 2, 2, requires_grad=True)
    infonce_loss(s, torch.randn(4, 3, 2, 2), 0.4, torch.tensor([0, 0, 1, 1])).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "subject, match",
    [
        (torch.tensor([0, 1, 2]), r"shape \(4,\)"),
        (torch.zeros(4, 1, dtype=torch.long), r"shape \(4,\)"),
        (torch.tensor([0.0, 1.0, 0.0, 1.0]), "integers"),
        ([0, 1, 0, 1], r"shape \(4,\)"),
    ],
)
def test_infonce_bad_subjects_are_errors(subject, match: str) -> None:
    with pytest.raises(MTKDError, match=match):
        infonce_loss(torch.randn(4, 2, 2, 2), torch.randn(4, 2, 2, 2), 0.4, subject)


def test_tap_pair_negatives_are_checked() -> None:
    assert TapPair("a", "b").negatives == "batch"
    assert TapPair("a", "b", negatives="other_subjects").negatives == "other_subjects"
    with pytest.raises(MTKDError, match="negatives must be one of"):
        TapPair("a", "b", negatives="others")
    with pytest.raises(MTKDError, match="InfoNCE loss only"):
        TapPair("a", "b", loss="mse", negatives="other_subjects")
    pair = TapPair("a", "b", negatives="other_subjects")
    assert TapPair.from_dict(pair.to_dict()) == pair


def _distiller(negatives: str) -> Distiller:
    torch.manual_seed(1)  # the same connectors for every call
    student = UNet(2, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=0)
    teacher = BasicUNet(
        spatial_dims=2, in_channels=1, out_channels=2, features=(8, 8, 16, 16, 32, 8)
    )
    pairs = [TapPair("model.1.submodule.2", "upcat_1", name="D-D", negatives=negatives)]
    return Distiller(student, teacher, pairs, None, torch.zeros(2, 1, 32, 32))


def test_distiller_passes_subjects_to_infonce() -> None:
    x = torch.randn(4, 1, 32, 32)
    batch = _distiller("batch")(x).terms["D-D"]
    others = _distiller("other_subjects")
    assert torch.allclose(others(x, subject=torch.arange(4)).terms["D-D"], batch, atol=1e-6)
    mixed = others(x, subject=torch.tensor([0, 0, 1, 1])).terms["D-D"]
    assert mixed.item() > 0 and abs(mixed.item() - batch.item()) > 1e-5
    assert others(x, subject=torch.zeros(4, dtype=torch.long)).terms["D-D"].item() == 0.0
    with pytest.raises(MTKDError, match="D-D.*other_subjects.*subject="):
        others(x)
    _distiller("batch")(x, subject=torch.zeros(4, dtype=torch.long))  # unused: no error


def test_training_step_gives_the_batch_subjects_to_the_distiller() -> None:
    distiller = _distiller("other_subjects")
    step = TrainingStep(
        distiller, SegmentationLoss("dice_ce", "softmax"), seg_weight=1.0, activation="softmax"
    )
    x, y = torch.randn(4, 1, 32, 32), torch.randint(0, 2, (4, 1, 32, 32))
    _, terms = step(x, y, subject=torch.tensor([3, 3, 3, 3]))
    assert terms["D-D"].item() == 0.0
    _, terms = step(x, y, subject=torch.tensor([3, 3, 4, 4]))
    assert terms["D-D"].item() > 0


S1 = {"name": "thesis_s1", "params": {}, "reconstruction": "none"}
T1 = {"name": "thesis_t1_backbone", "params": {}, "reconstruction": "masked"}


def test_config_negatives_reach_every_infonce_pair() -> None:
    config = DistillConfig(teacher="t", preset="thesis", negatives="other_subjects")
    pairs, _ = resolve_terms(config, S1, T1)
    assert [p.negatives for p in pairs] == ["other_subjects"] * 3
    pairs, _ = resolve_terms(DistillConfig(teacher="t", preset="thesis"), S1, T1)
    assert {p.negatives for p in pairs} == {"batch"}
    config.feature_loss = "mse"  # no negatives to choose: the pairs keep the default
    assert {p.negatives for p in resolve_terms(config, S1, T1)[0]} == {"batch"}
    explicit = DistillConfig(
        teacher="t",
        negatives="other_subjects",
        pairs=[TapPairConfig("a", "b"), TapPairConfig("c", "d", loss="cosine")],
    )
    pairs, _ = resolve_terms(explicit, S1, T1)
    assert [p.negatives for p in pairs] == ["other_subjects", "batch"]


def test_run_config_negatives_key(tmp_path) -> None:
    base = {"kind": "distill", "data": {"source": str(tmp_path)}}
    config = RunConfig.from_dict(
        {**base, "distill": {"teacher": "t", "preset": "thesis", "negatives": "other_subjects"}}
    )
    assert config.distill.negatives == "other_subjects"
    assert RunConfig.from_dict({**base, "distill": {"teacher": "t"}}).distill.negatives == "batch"
    with pytest.raises(MTKDError, match="distill.negatives"):
        RunConfig.from_dict({**base, "distill": {"teacher": "t", "negatives": "subjects"}})


# ---------------------------------------------------------------- masked reconstruction (MAE)


def test_reconstruction_loss_by_hand() -> None:
    target = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]).repeat(1, 2, 1, 1)  # (1, 2, 2, 2)
    recon = torch.zeros_like(target)
    mask = torch.tensor([[[[True, False], [False, True]]]])  # voxels 1 and 4 masked
    # masked voxels, both channels: (1 + 16) * 2 values over 4 entries
    assert reconstruction_loss(recon, target, mask).item() == pytest.approx(17 / 2)
    assert reconstruction_loss(recon, target).item() == pytest.approx(30 / 4)
    assert torch.allclose(reconstruction_loss(recon, target), F.mse_loss(recon, target))
    empty = torch.zeros_like(mask)
    assert reconstruction_loss(recon, target, empty).item() == 0.0


def test_reconstruction_loss_on_masked_patches_ignores_the_visible_voxels() -> None:
    target, recon = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8, requires_grad=True)
    mask = torch.rand(2, 1, 8, 8) < 0.5
    loss = reconstruction_loss(recon, target, mask)
    changed = recon.detach() + 10.0 * (~mask) * torch.randn(2, 3, 8, 8)  # visible voxels only
    assert torch.allclose(reconstruction_loss(changed, target, mask), loss, atol=1e-6)
    assert not torch.allclose(
        reconstruction_loss(changed, target), reconstruction_loss(recon, target)
    )
    loss.backward()
    visible = (~mask).expand_as(recon)
    assert recon.grad[visible].abs().max() == 0 and recon.grad[~visible].abs().sum() > 0


def _teacher(mode: str = "masked"):
    return build_teacher(
        "thesis_unet", mode, channels=(4, 8), bottleneck=16, mask_patch=4, in_channels=1
    )


def test_multitask_losses_on_masked_patches_match_the_mask_drawn() -> None:
    teacher = _teacher().eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        seg, masked_loss = teacher.multitask_losses(x, torch.Generator().manual_seed(3), "masked")
        _, all_loss = teacher.multitask_losses(x, torch.Generator().manual_seed(3), "all")
        masked, mask = teacher.mask_patches(x, generator=torch.Generator().manual_seed(3))
        recon = teacher.reconstruct(masked)
    assert torch.allclose(masked_loss, reconstruction_loss(recon, x, mask))
    assert torch.allclose(all_loss, F.mse_loss(recon, x))
    assert torch.allclose(seg, teacher(x))
    assert mask.any() and (~mask).any() and abs(masked_loss.item() - all_loss.item()) > 1e-6
    with pytest.raises(MTKDError, match="loss_on"):
        teacher.multitask_losses(x, loss_on="visible")
    with pytest.raises(MTKDError, match="needs reconstruction_mode 'masked'"):
        _teacher("unmasked").multitask_losses(x, loss_on="masked")


def test_training_step_uses_the_masked_reconstruction_loss() -> None:
    teacher = _teacher().eval()
    x, y = torch.randn(2, 1, 16, 16), torch.randint(0, 2, (2, 1, 16, 16))
    seg_loss = SegmentationLoss("dice_ce", "sigmoid")
    for loss_on in ("all", "masked"):
        step = TrainingStep(
            teacher,
            seg_loss,
            seg_weight=0.0,
            activation="sigmoid",
            reconstruction="masked",
            reconstruction_weight=1.0,
            reconstruction_loss_on=loss_on,
        )
        with torch.no_grad():
            loss, terms = step(x, y, torch.Generator().manual_seed(5))
            _, expected = teacher.multitask_losses(x, torch.Generator().manual_seed(5), loss_on)
        assert torch.allclose(loss, expected) and torch.allclose(terms["reconstruction"], expected)


def test_run_config_reconstruction_loss_on(tmp_path) -> None:
    base = {"data": {"source": str(tmp_path)}}
    config = RunConfig.from_dict(
        {**base, "multitask": {"reconstruction": "masked", "reconstruction_loss_on": "masked"}}
    )
    assert config.multitask.reconstruction_loss_on == "masked"
    assert RunConfig.from_dict(base).multitask.reconstruction_loss_on == "all"
    with pytest.raises(MTKDError, match="multitask.reconstruction_loss_on"):
        RunConfig.from_dict({**base, "multitask": {"reconstruction_loss_on": "visible"}})
    with pytest.raises(MTKDError, match="multitask.reconstruction_loss_on"):
        RunConfig.from_dict(
            {
                **base,
                "multitask": {"reconstruction": "unmasked", "reconstruction_loss_on": "masked"},
            }
        )


def _stats(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.clone()
        for k, v in module.state_dict().items()
        if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
    }


def test_batchnorm_statistics_come_from_clean_inputs_only() -> None:
    teacher = _teacher().train()
    x = 3.0 * torch.randn(4, 1, 16, 16) + 1.0
    clean_only = copy.deepcopy(teacher)
    clean_only.backbone(x)  # a clean pass alone, in training mode
    expected = _stats(clean_only.backbone)
    step = copy.deepcopy(teacher)
    seg, recon, _ = step.multitask_outputs(x, torch.Generator().manual_seed(0))
    got = _stats(step.backbone)
    assert expected and got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    # the masked pass was a real training pass (batch statistics) of a decoder that keeps its
    # own running statistics
    before, after = _stats(teacher.recon_decoder), _stats(step.recon_decoder)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert recon.requires_grad and seg.requires_grad
    (seg.square().mean() + recon.square().mean()).backward()  # nothing saved was overwritten
    assert all(p.grad is not None for p in step.backbone.parameters())
    assert set(dict(step.backbone.named_buffers())) == set(dict(teacher.backbone.named_buffers()))
    # the check can fail: a masked pass that is not frozen moves the backbone's statistics
    unfrozen = copy.deepcopy(teacher)
    masked, _ = unfrozen.mask_patches(x, generator=torch.Generator().manual_seed(0))
    unfrozen.reconstruct(masked)
    unfrozen.backbone(x)
    moved = _stats(unfrozen.backbone)
    assert any(not torch.equal(moved[k], expected[k]) for k in expected if "running_mean" in k)


def test_frozen_running_stats_keeps_training_mode_normalisation() -> None:
    layer = torch.nn.BatchNorm2d(3, momentum=None).train()  # cumulative average, too
    x = 5.0 * torch.randn(4, 3, 6, 6) + 2.0
    with frozen_running_stats(layer):
        out = layer(x)
    assert torch.equal(layer.running_mean, torch.zeros(3))
    assert torch.equal(layer.running_var, torch.ones(3)) and int(layer.num_batches_tracked) == 0
    # normalised with the batch's own statistics, as in training
    assert torch.allclose(out.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    layer(x)
    assert not torch.equal(layer.running_mean, torch.zeros(3))  # outside, it updates again


# ---------------------------------------------------------------- published baseline settings


@pytest.mark.parametrize(
    "preset, loss, weight, temperature",
    [
        ("cwd_published", "cwd", 3.0, 4.0),  # Shu et al. 2021, segmentation
        ("dist_published", "dist", 1.0, 1.0),  # Huang et al. 2022
        ("hinton_published", "pmd", 1.0, 1.0),  # Hinton KD as CIRKD runs it
    ],
)
def test_output_presets_resolve_to_the_published_numbers(
    preset: str, loss: str, weight: float, temperature: float
) -> None:
    assert preset in PRESETS and preset in OUTPUT_PRESETS
    config = DistillConfig(teacher="t", preset=preset)
    term = resolve_output_term(config)
    assert (term.loss, term.weight, term.temperature) == (loss, weight, temperature)
    pairs, output = resolve_terms(config, S1, T1)
    assert pairs == [] and output == term
    assert feature_weights(config) == {} and feature_weights(config, S1, T1) == {}
    config.scale = 0.5
    assert resolve_output_term(config).weight == weight * 0.5
    assert OUTPUT_PRESETS[preset].weight == weight  # the preset itself is not changed
    run = RunConfig.from_dict(
        {"kind": "distill", "data": {"source": "x"}, "distill": {"teacher": "t", "preset": preset}}
    )
    assert run.distill.preset == preset


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"output": OutputTermConfig(loss="pmd")}, "give either the preset or distill.output"),
        ({"feature_loss": "mse"}, "distill.feature_loss.*has none"),
        ({"scale_weights": {"B-B": 0.1}}, "distill.scale_weights.*has none"),
        ({"pairs": [TapPairConfig("a", "b")]}, "not both"),
    ],
)
def test_output_presets_refuse_what_would_change_them(changes: dict, match: str) -> None:
    config = DistillConfig(teacher="t", preset="cwd_published", **changes)
    with pytest.raises(MTKDError, match=match):
        resolve_output_term(config)


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


# (B=1, C=2, 2x2) logits for the hand computations below
S = torch.tensor([[[[0.0, 1.0], [2.0, -1.0]], [[0.5, 0.5], [-0.5, 3.0]]]])
T = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]], [[-1.0, 2.0], [1.0, 0.0]]]])


def _term(preset: str):
    term = OUTPUT_PRESETS[preset]
    return get_output_loss(term.loss)(S, T, term.temperature), term.temperature


def test_cwd_published_by_hand() -> None:
    got, tau = _term("cwd_published")  # softmax over the 4 positions of each channel
    kl = []
    for c in range(2):
        ps = _softmax([v / tau for v in S[0, c].flatten().tolist()])
        pt = _softmax([v / tau for v in T[0, c].flatten().tolist()])
        kl.append(sum(b * math.log(b / a) for a, b in zip(ps, pt)))
    assert got.item() == pytest.approx(tau**2 * sum(kl) / 2, rel=1e-5)


def _pearson(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return num / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def test_dist_published_by_hand() -> None:
    s = torch.tensor([[[[0.0, 1.0, 2.0]], [[1.0, -1.0, 0.5]], [[2.0, 0.0, -1.0]]]])  # (1,3,1,3)
    t = torch.tensor([[[[1.0, 0.0, 0.0]], [[0.0, 2.0, 1.0]], [[-1.0, 1.0, 3.0]]]])
    term = OUTPUT_PRESETS["dist_published"]
    tau = term.temperature
    ps = [_softmax([s[0, c, 0, n].item() / tau for c in range(3)]) for n in range(3)]
    pt = [_softmax([t[0, c, 0, n].item() / tau for c in range(3)]) for n in range(3)]
    inter = sum(1 - _pearson(ps[n], pt[n]) for n in range(3)) / 3  # per voxel, over classes
    intra = (
        sum(  # per class, over voxels
            1 - _pearson([ps[n][c] for n in range(3)], [pt[n][c] for n in range(3)])
            for c in range(3)
        )
        / 3
    )
    expected = tau**2 * (1.0 * inter + 1.0 * intra)  # beta = gamma = 1
    got = get_output_loss(term.loss)(s, t, tau)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_hinton_published_by_hand() -> None:
    got, tau = _term("hinton_published")  # softmax over the 2 classes at each voxel
    kl = []
    for i in range(2):
        for j in range(2):
            ps = _softmax([S[0, c, i, j].item() / tau for c in range(2)])
            pt = _softmax([T[0, c, i, j].item() / tau for c in range(2)])
            kl.append(sum(b * math.log(b / a) for a, b in zip(ps, pt)))
    assert got.item() == pytest.approx(tau**2 * sum(kl) / 4, rel=1e-5)
    # one sigmoid channel: the same KD on the two classes [background, foreground]
    z_s, z_t = S[:, 1:], T[:, 1:]
    two = lambda z: torch.cat([torch.zeros_like(z), z], dim=1)  # noqa: E731
    loss = get_output_loss("pmd")
    assert torch.allclose(loss(z_s, z_t, tau), loss(two(z_s), two(z_t), tau), atol=1e-6)


# ---------------------------------------------------------------- through the trainer


def _run(config: dict, run_dir) -> list[dict]:
    from mtkd.engine.trainer import Trainer
    from mtkd.run_folder import read_events

    Trainer(RunConfig.from_dict(config), run_dir, progress=False, log=lambda _: None).run()
    return [e for e in read_events(run_dir / "events.jsonl") if e["type"] == "metrics"]


@pytest.mark.slow
def test_teacher_run_with_the_masked_reconstruction_loss(make_config, tmp_path) -> None:
    records = {}
    for loss_on in ("all", "masked"):
        config = make_config("train", name=f"t-{loss_on}")
        config["train"]["epochs"] = 1
        config["multitask"]["reconstruction_loss_on"] = loss_on
        records[loss_on] = _run(config, tmp_path / loss_on)[-1]
    masked, full = records["masked"]["reconstruction"], records["all"]["reconstruction"]
    assert math.isfinite(masked) and masked > 0 and masked != pytest.approx(full, rel=1e-6)


@pytest.mark.slow
def test_distillation_run_without_same_subject_negatives(teacher_run, make_config, tmp_path):
    records = {}
    for negatives in ("batch", "other_subjects"):
        config = make_config(
            "distill",
            name=f"kd-{negatives}",
            train_on="student_train",
            distill={"teacher": str(teacher_run), "preset": "thesis", "negatives": negatives},
        )
        config["train"]["epochs"] = 1
        records[negatives] = _run(config, tmp_path / negatives)[-1]
    for label in ("E-E", "B-B", "D-D"):
        other, batch = records["other_subjects"][label], records["batch"][label]
        assert math.isfinite(other) and other >= 0
        # batches hold several slices of one patient: they are no longer negatives
        assert other != pytest.approx(batch, rel=1e-6), label
