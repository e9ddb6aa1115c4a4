"""Supervised voxel-level contrastive distillation (feature loss ``supcon``): the loss, its
memory and sampling, the projection heads in the Distiller, the config rule, and a tiny run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import stop_at_batch
from monai.networks.nets import BasicUNet, UNet

from mtkd.config import RunConfig
from mtkd.distill.connectors import ContrastConnector
from mtkd.distill.distiller import Distiller
from mtkd.distill.losses import (
    FEATURE_LOSSES,
    SupervisedVoxelContrast,
    get_feature_loss,
    resize_labels,
)
from mtkd.distill.presets import resolve_terms
from mtkd.distill.spec import OutputTerm, TapPair
from mtkd.engine.trainer import Trainer, TrainingInterrupted, resume_run
from mtkd.errors import MTKDError
from mtkd.modelfiles.checkpoint import load_checkpoint
from mtkd.run_folder import read_events


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def quiet(config: dict, run_dir, **options) -> Trainer:
    return Trainer(
        RunConfig.from_dict(config), run_dir, progress=False, log=lambda _: None, **options
    )


def _flat(x: torch.Tensor) -> list[list[float]]:
    """(B, D, *S) -> one list of D floats per voxel, in (b, *s) order."""
    return x.double().movedim(1, -1).reshape(-1, x.shape[1]).tolist()


def _by_hand(anchors, anchor_classes, keys, key_classes, tau: float) -> float:
    """The pixel-contrast formula with Python floats: mean over anchors that have a negative of
    -1/|P| sum_p log(e_p / (e_p + sum_n e_n))."""

    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    anchors, keys = [unit(v) for v in anchors], [unit(v) for v in keys]
    losses = []
    for a, ya in zip(anchors, anchor_classes):
        sims = [sum(p * q for p, q in zip(a, k)) / tau for k in keys]
        negatives = [math.exp(s) for s, y in zip(sims, key_classes) if y != ya]
        if not negatives:
            continue
        positives = [s for s, y in zip(sims, key_classes) if y == ya]
        terms = [-math.log(math.exp(s) / (math.exp(s) + sum(negatives))) for s in positives]
        losses.append(sum(terms) / len(terms))
    return sum(losses) / len(losses)


def _all(dim: int, classes: int, **options) -> SupervisedVoxelContrast:
    """A loss that draws every voxel (so that a by-hand computation needs no sampling)."""
    return SupervisedVoxelContrast(dim, classes, anchors_per_class=10_000, **options)


# ---------------------------------------------------------------- the loss


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_matches_hand_computation(tau: float) -> None:
    s, t = torch.randn(2, 3, 3, 2), torch.randn(2, 3, 3, 2)
    y = torch.tensor([[[0, 1], [2, 1], [0, 0]], [[2, 2], [1, 0], [0, 1]]])
    got = _all(3, 3, temperature=tau, memory_size=0)(s, t, y).item()
    classes = y.flatten().tolist()
    assert got == pytest.approx(_by_hand(_flat(s), classes, _flat(t), classes, tau), rel=1e-5)


def test_default_temperature_is_01() -> None:
    loss = SupervisedVoxelContrast(4, 2)
    assert loss.temperature == 0.1
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    y = torch.randint(0, 2, (2, 3, 3))
    classes = y.flatten().tolist()
    expected = _by_hand(_flat(s), classes, _flat(t), classes, 0.1)
    assert loss.eval()(s, t, y).item() == pytest.approx(expected, rel=1e-5)


SHAPES = [(2, 8, 6, 5), (2, 8, 4, 3, 5)]  # 2-D and 3-D embeddings


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
@pytest.mark.parametrize("classes", [2, 4], ids=["binary", "multiclass"])
def test_positive_finite_with_gradients_to_both(shape: tuple[int, ...], classes: int) -> None:
    s = torch.randn(shape, requires_grad=True)
    t = torch.randn(shape, requires_grad=True)
    labels = torch.randint(0, classes, (shape[0], 1, *shape[2:]))  # (B, 1, *S) accepted too
    loss = SupervisedVoxelContrast(shape[1], classes)(s, t, labels)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for grad in (s.grad, t.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_low_when_embeddings_cluster_by_class() -> None:
    prototypes = torch.eye(3, 16)  # orthogonal class prototypes
    y = torch.randint(0, 3, (2, 8, 8))
    clustered = prototypes[y].movedim(-1, 1)  # (2, 16, 8, 8)
    loss = SupervisedVoxelContrast(16, 3, memory_size=0)
    good = loss(clustered, clustered + 0.01 * torch.randn_like(clustered), y).item()
    bad = loss(torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8), y).item()
    assert good < 0.05 < 1.0 < bad


def test_single_class_batch_is_zero_with_a_gradient_path() -> None:
    for value, classes in ((0, 2), (1, 2), (3, 5)):  # all background; all foreground
        s = torch.randn(2, 4, 5, 5, requires_grad=True)
        t = torch.randn(2, 4, 5, 5, requires_grad=True)
        loss = SupervisedVoxelContrast(4, classes)(s, t, torch.full((2, 5, 5), value))
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.equal(s.grad, torch.zeros_like(s)) and torch.isfinite(t.grad).all()


def test_ignored_voxels_are_never_drawn() -> None:
    s, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    y = torch.randint(0, 2, (2, 4, 4))
    y[0, :2] = 255
    ignored = y == 255
    loss = _all(4, 2, memory_size=0, ignore_index=255)
    drawn = loss._draw(y.flatten())
    assert not ignored.flatten()[drawn].any() and len(drawn) == int((~ignored).sum())
    reference = loss(s, t, y)
    s2, t2 = s.clone(), t.clone()
    s2.movedim(1, -1)[ignored] = 100.0  # changing the ignored voxels changes nothing
    t2.movedim(1, -1)[ignored] = -100.0
    assert torch.equal(loss(s2, t2, y), reference)
    with pytest.raises(MTKDError, match="255"):  # not a class without ignore_index
        _all(4, 2, memory_size=0)(s, t, y)


def test_a_class_whose_voxels_are_all_ignored_has_no_anchor() -> None:
    s, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    y = torch.randint(0, 2, (2, 4, 4))
    y[1, 3, 3] = 2  # the only voxel of class 2, ignored with ignore_index=2
    got = _all(4, 3, memory_size=0, ignore_index=2)(s, t, y).item()
    classes = y.flatten().tolist()
    kept = [i for i, c in enumerate(classes) if c != 2]
    fs, ft, ys = _flat(s), _flat(t), [classes[i] for i in kept]
    without = _by_hand([fs[i] for i in kept], ys, [ft[i] for i in kept], ys, 0.1)
    assert got == pytest.approx(without, rel=1e-5)
    with_it = _all(4, 3, memory_size=0)(s, t, y).item()
    assert with_it == pytest.approx(_by_hand(fs, classes, ft, classes, 0.1), rel=1e-5)
    assert abs(with_it - got) > 1e-3


def test_class_balanced_draw_gives_rare_classes_anchors() -> None:
    y = torch.zeros(2, 16, 16, dtype=torch.long)
    y[:, 4:12, 4:12] = 1
    y[1, 0, :3] = 2  # 3 voxels of a rare class among 512
    loss = SupervisedVoxelContrast(4, 3, anchors_per_class=8)
    index = loss._draw(y.flatten())
    drawn = y.flatten()[index]
    assert [int((drawn == c).sum()) for c in range(3)] == [8, 8, 3]
    assert len(set(index.tolist())) == len(index)  # without replacement
    capped = SupervisedVoxelContrast(4, 3, anchors_per_class=8, max_anchors=6)
    assert [int((y.flatten()[capped._draw(y.flatten())] == c).sum()) for c in range(3)] == [2] * 3


def test_labels_are_resized_to_the_embedding_grid() -> None:
    y = torch.randint(0, 3, (2, 1, 16, 12))
    small = resize_labels(y, (8, 6))
    assert small.dtype == torch.int64 and small.shape == (2, 8, 6)
    assert torch.equal(small, y[:, 0, ::2, ::2])  # nearest neighbour
    assert torch.equal(resize_labels(y[:, 0].float(), (16, 12)), y[:, 0])
    y3 = torch.randint(0, 2, (2, 8, 8, 4))
    assert torch.equal(resize_labels(y3, (4, 4, 2)), y3[:, ::2, ::2, ::2])
    s, t = torch.randn(2, 4, 8, 6), torch.randn(2, 4, 8, 6)
    loss = SupervisedVoxelContrast(4, 3, memory_size=0)
    assert torch.equal(loss(s, t, y), loss(s, t, small))
    with pytest.raises(MTKDError, match="class indices"):
        resize_labels(torch.zeros(2, 3, 16, 12), (8, 6))  # one-hot is not class indices


def test_memory_fills_per_class_and_takes_part_in_the_loss() -> None:
    s1, t1 = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    s2, t2 = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    y1, y2 = torch.randint(0, 3, (2, 3, 3)), torch.randint(0, 3, (2, 3, 3))
    loss = _all(4, 3, memory_size=32)
    loss(s1, t1, y1)  # training mode: remembered
    counts = torch.bincount(y1.flatten(), minlength=3)
    assert torch.equal(loss.memory_count, counts) and int(loss.step) == 1
    keys, classes = loss.memory_entries()
    assert sorted(classes.tolist()) == sorted(y1.flatten().tolist())
    stored = F.normalize(t1.movedim(1, -1).reshape(-1, 4), dim=1)
    for c in range(3):  # the class's teacher embeddings, normalised
        assert torch.allclose(keys[classes == c], stored[y1.flatten() == c], atol=1e-6)
    loss.eval()
    with_memory = loss(s2, t2, y2).item()
    assert torch.equal(loss.memory_count, counts) and int(loss.step) == 1  # eval: unchanged
    c2, c1 = y2.flatten().tolist(), y1.flatten().tolist()
    expected = _by_hand(_flat(s2), c2, _flat(t2) + _flat(t1), c2 + c1, 0.1)
    assert with_memory == pytest.approx(expected, rel=1e-5)
    without = _all(4, 3, memory_size=0)(s2, t2, y2).item()
    assert without != pytest.approx(with_memory, rel=1e-3)
    loss.reset_memory()
    assert loss(s2, t2, y2).item() == pytest.approx(without, rel=1e-6)


def test_memory_is_first_in_first_out_and_bounded() -> None:
    loss = _all(2, 2, memory_size=5)
    for _ in range(4):
        loss(torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2), torch.tensor([[[0, 0], [0, 1]]]))
    assert loss.memory_count.tolist() == [5, 4]
    assert loss.memory_next.tolist() == [(4 * 3) % 5, 4]
    last = torch.randn(1, 2, 2, 2)
    loss(torch.randn(1, 2, 2, 2), last, torch.tensor([[[0, 0], [0, 1]]]))
    keys, classes = loss.memory_entries()
    newest = F.normalize(last.movedim(1, -1).reshape(-1, 2), dim=1)
    slots = [(12 + k) % 5 for k in range(3)]
    assert torch.allclose(loss.memory[0, slots], newest[:3], atol=1e-6)
    assert loss.memory_count.tolist() == [5, 5]


def test_the_draws_are_deterministic_and_follow_the_state_dict() -> None:
    y = torch.randint(0, 3, (2, 12, 12))
    s, t = torch.randn(2, 4, 12, 12), torch.randn(2, 4, 12, 12)
    a = SupervisedVoxelContrast(4, 3, anchors_per_class=5, seed=7)
    b = SupervisedVoxelContrast(4, 3, anchors_per_class=5, seed=7)
    first = a(s, t, y)
    assert torch.equal(first, b(s, t, y))
    assert not torch.equal(a(s, t, y), first)  # the next call draws other anchors
    c = SupervisedVoxelContrast(4, 3, anchors_per_class=5, seed=99)
    c.load_state_dict(b.state_dict())  # seed, step and memory: c continues as b
    assert torch.equal(c(s, t, y), b(s, t, y))
    torch.manual_seed(3)
    d = SupervisedVoxelContrast(4, 3, anchors_per_class=5)
    torch.manual_seed(3)
    e = SupervisedVoxelContrast(4, 3, anchors_per_class=5)
    assert torch.equal(d(s, t, y), e(s, t, y))  # seeded from the torch seed


def test_memory_follows_to_and_bad_inputs_are_errors() -> None:
    loss = SupervisedVoxelContrast(4, 3).double()
    assert loss.memory.dtype == torch.float64 and loss.step.dtype == torch.int64
    loss(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.randint(0, 3, (2, 3, 3)))
    assert int(loss.memory_count.sum()) == 18
    with pytest.raises(MTKDError, match="same shape"):
        loss(torch.randn(2, 4, 3, 3), torch.randn(2, 5, 3, 3), torch.zeros(2, 3, 3))
    with pytest.raises(MTKDError, match="label maps"):
        loss(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.zeros(3, 3, 3))
    with pytest.raises(MTKDError, match="not classes"):
        loss(torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2), torch.full((1, 2, 2), 3))
    for options in ({"temperature": 0.0}, {"num_classes": 1}, {"memory_size": -1}):
        with pytest.raises(MTKDError):
            SupervisedVoxelContrast(**{"dim": 4, "num_classes": 3, **options})


def test_float32_under_autocast() -> None:
    s = torch.randn(2, 4, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = SupervisedVoxelContrast(4, 2)(
            s.bfloat16(), torch.randn(2, 4, 6, 6).bfloat16(), torch.randint(0, 2, (2, 6, 6))
        )
    assert loss.dtype == torch.float32
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


# ---------------------------------------------------------------- in the Distiller

X2D = torch.randn(4, 1, 32, 32)
Y2D = torch.randint(0, 3, (4, 1, 32, 32))
SUPCON_2D = [
    TapPair("model.0", "down_1", loss="supcon", name="E-E"),  # 16x16 <- 16x16
    TapPair("model.1.submodule.1.submodule", "down_4", loss="supcon", name="B-B"),  # 8 <- 2
    TapPair("model.1.submodule.2", "upcat_1", loss="infonce", name="D-D"),
]


def _teacher_2d(classes: int = 3) -> BasicUNet:
    return BasicUNet(
        spatial_dims=2, in_channels=1, out_channels=classes, features=(8, 8, 16, 16, 32, 8)
    )


def _student_2d(classes: int = 3) -> UNet:
    return UNet(2, 1, classes, channels=(4, 8, 16), strides=(2, 2), num_res_units=0)


def test_spec_and_registry() -> None:
    assert "supcon" in FEATURE_LOSSES
    assert TapPair("a", "b", loss="supcon").temperature == 0.1
    assert TapPair("a", "b").temperature == 0.4  # InfoNCE keeps the paper's
    assert TapPair("a", "b", loss="supcon", temperature=0.2).temperature == 0.2
    pair = TapPair("a", "b", loss="supcon")
    assert TapPair.from_dict(pair.to_dict()) == pair
    with pytest.raises(MTKDError, match="labels"):
        get_feature_loss("supcon")


def test_distiller_supcon_terms_heads_and_gradients() -> None:
    teacher = _teacher_2d()
    distiller = Distiller(_student_2d(), teacher, SUPCON_2D, OutputTerm(), X2D[:1]).train()
    for label in ("E-E", "B-B"):
        connector = distiller.connectors[label]
        assert isinstance(connector, ContrastConnector)
        assert connector.criterion.num_classes == 3 and connector.criterion.temperature == 0.1
    out = distiller(X2D, labels=Y2D)
    assert set(out.terms) == {"E-E", "B-B", "D-D", "pmd"}
    tapped = {"E-E": "model.0", "B-B": "model.1.submodule.1.submodule"}
    for label, module in tapped.items():
        term = out.terms[label]
        assert term.ndim == 0 and torch.isfinite(term) and term.item() > 0, label
        distiller.zero_grad(set_to_none=True)
        term.backward(retain_graph=True)
        layer = distiller.student.get_submodule(module)
        assert sum(p.grad.abs().sum() for p in layer.parameters()) > 0, label
        for head in ("student_head", "teacher_head"):
            weights = getattr(distiller.connectors[label], head)[0].weight
            assert weights.grad is not None and weights.grad.abs().sum() > 0, (label, head)
        assert all(p.grad is None for p in teacher.parameters())
    assert all(not p.requires_grad for p in teacher.parameters())
    # the heads are trained with the student, and are not part of the student
    trainable = {id(p) for p in distiller.trainable_parameters()}
    heads = [p for label in tapped for p in distiller.connectors[label].parameters()]
    assert heads and {id(p) for p in heads} <= trainable
    assert not any("head" in key for key in distiller.student.state_dict())
    keys = set(distiller.connector_state_dict())
    for part in ("student_head.0.weight", "teacher_head.2.weight", "criterion.memory"):
        assert f"E-E.{part}" in keys and f"B-B.{part}" in keys
    memory = distiller.connectors["E-E"].criterion.memory_count
    assert int(memory.sum()) > 0  # the training call filled the memory


def test_distiller_supcon_needs_labels() -> None:
    distiller = Distiller(_student_2d(), _teacher_2d(), SUPCON_2D, None, X2D[:1])
    with pytest.raises(MTKDError, match="E-E, B-B.*labels"):
        distiller(X2D)
    with pytest.raises(MTKDError, match="class indices"):
        distiller(X2D, labels=torch.zeros(4, 3, 32, 32, dtype=torch.long))
    plain = Distiller(_student_2d(), _teacher_2d(), SUPCON_2D[2:], None, X2D[:1])
    assert torch.equal(plain(X2D).loss, plain(X2D, labels=Y2D).loss)  # labels unused


def test_distiller_supcon_3d_binary_and_ignore_index() -> None:
    teacher = BasicUNet(spatial_dims=3, in_channels=1, out_channels=1, features=(4, 4, 8, 8, 8, 4))
    student = UNet(3, 1, 1, channels=(2, 4), strides=(2,), num_res_units=0)
    x = torch.randn(2, 1, 32, 32, 32)
    y = torch.zeros(2, 32, 32, 32, dtype=torch.long)
    y[:, 8:24, 8:24, 8:24] = 1
    y[:, :, :, :4] = 9  # an ignored slab
    pairs = [TapPair("model.1.submodule", "down_2", loss="supcon", name="B-B")]  # 16^3 <- 8^3
    distiller = Distiller(student, teacher, pairs, OutputTerm(), x[:1], ignore_index=9)
    criterion = distiller.connectors["B-B"].criterion
    assert criterion.num_classes == 2 and criterion.ignore_index == 9  # one sigmoid channel
    out = distiller(x, labels=y)
    assert out.terms["B-B"].item() > 0
    out.loss.backward()
    assert all(p.grad is not None for p in distiller.student.parameters())
    connector = distiller.connectors["B-B"]
    embedding = connector(
        torch.randn(2, connector.student_channels, 16, 16, 16),
        torch.randn(2, connector.teacher_channels, 8, 8, 8),
    )
    assert embedding[0].shape == embedding[1].shape == (2, 128, 16, 16, 16)
    background = distiller(x, labels=torch.zeros_like(y))  # memory holds foreground now
    assert torch.isfinite(background.terms["B-B"])
    criterion.reset_memory()
    assert distiller.eval()(x, labels=torch.zeros_like(y)).terms["B-B"].item() == 0.0


def test_distiller_heads_learn_and_state_round_trips() -> None:
    teacher = _teacher_2d()
    distiller = Distiller(_student_2d(), teacher, SUPCON_2D[:1], None, X2D[:1])
    before = {k: v.clone() for k, v in distiller.connector_state_dict().items()}
    optimiser = torch.optim.Adam(distiller.trainable_parameters(), lr=1e-2)
    distiller.train()
    for _ in range(3):
        optimiser.zero_grad()
        distiller(X2D, labels=Y2D).loss.backward()
        optimiser.step()
    after = distiller.connector_state_dict()
    for key in ("E-E.student_head.0.weight", "E-E.teacher_head.2.weight"):
        assert not torch.allclose(after[key], before[key]), key
    assert int(after["E-E.criterion.step"]) == 3
    fresh = Distiller(_student_2d(), teacher, SUPCON_2D[:1], None, X2D[:1])
    fresh.student.load_state_dict(distiller.student.state_dict())
    fresh.load_connector_state_dict(after)
    fresh.train()
    assert torch.equal(fresh(X2D, labels=Y2D).loss, distiller(X2D, labels=Y2D).loss)


# ---------------------------------------------------------------- config and a run


def test_presets_and_pairs_take_the_supcon_temperature() -> None:
    s1 = {"name": "thesis_s1", "params": {}, "reconstruction": "none"}
    t1 = {"name": "thesis_t1_backbone", "params": {}, "reconstruction": "masked"}
    config = RunConfig.from_dict(
        {
            "kind": "distill",
            "distill": {"teacher": "t", "preset": "thesis", "feature_loss": "supcon"},
        }
    ).distill
    pairs, _ = resolve_terms(config, s1, t1)
    assert {(p.loss, p.temperature) for p in pairs} == {("supcon", 0.1)}
    assert [p.name for p in pairs] == ["E-E", "B-B", "D-D"]
    config.feature_loss = None
    assert {p.temperature for p in resolve_terms(config, s1, t1)[0]} == {0.4}
    explicit = RunConfig.from_dict(
        {
            "kind": "distill",
            "distill": {
                "teacher": "t",
                "pairs": [
                    {"student": "enc2", "teacher": "backbone.enc2", "loss": "supcon"},
                    {"student": "dec2", "teacher": "backbone.dec2", "temperature": 0.3},
                    {"student": "bottleneck", "teacher": "backbone.bottleneck"},
                ],
            },
        }
    ).distill
    assert explicit.pairs[0].temperature is None
    pairs, _ = resolve_terms(explicit, s1, t1)
    assert [(p.loss, p.temperature) for p in pairs] == [
        ("supcon", 0.1),
        ("infonce", 0.3),
        ("infonce", 0.4),
    ]
    with pytest.raises(MTKDError, match="temperature"):
        RunConfig.from_dict(
            {
                "kind": "distill",
                "distill": {
                    "teacher": "t",
                    "pairs": [{"student": "a", "teacher": "b", "temperature": 0}],
                },
            }
        )


def _supcon_config(make_config, teacher_run, **train) -> dict:
    return make_config(
        "distill",
        name="student",
        model={"name": "thesis_s1", "params": {}},
        train_on="student_train",
        train={"epochs": 2, "batch_size": 4, "optimizer": {"name": "adamw", "lr": 1e-2}, **train},
        distill={"teacher": str(teacher_run), "preset": "thesis", "feature_loss": "supcon"},
    )


def test_supcon_distillation_run(teacher_run, make_config, tmp_path) -> None:
    trainer = quiet(_supcon_config(make_config, teacher_run), tmp_path / "kd")
    result = trainer.run()
    metrics = [e for e in read_events(tmp_path / "kd" / "events.jsonl") if e["type"] == "metrics"]
    for record in metrics:
        assert all(record[term] > 0 and math.isfinite(record[term]) for term in ("E-E", "B-B"))
        assert math.isfinite(record["D-D"]) and record["pmd"] > 0
    assert any(record["D-D"] > 0 for record in metrics)
    state = load_checkpoint(tmp_path / "kd" / "checkpoints" / "last.pt")
    for label in ("E-E", "B-B", "D-D"):
        for part in ("student_head.0.weight", "teacher_head.2.bias", "criterion.memory"):
            assert f"{label}.{part}" in state["connectors"]
    assert int(state["connectors"]["B-B.criterion.memory_count"].sum()) > 0
    exported = torch.load(result.model_dir / "model.pt", weights_only=True)
    assert set(exported) == set(trainer.models.network.state_dict())  # the plain student
    assert not any(word in key for key in exported for word in ("_head", "criterion", "memory"))
    # a resumed trainer restores the heads and the memory
    resumed = quiet(_supcon_config(make_config, teacher_run), tmp_path / "kd", resume=True)
    resumed._prepare_data()
    resumed._prepare_model()
    resumed._restore()
    restored = resumed.models.distiller.connector_state_dict()
    assert set(restored) == set(state["connectors"])
    assert all(torch.equal(restored[k], state["connectors"][k].to(restored[k])) for k in restored)


def test_supcon_run_resumed_mid_epoch_equals_a_straight_run(
    teacher_run, make_config, tmp_path
) -> None:
    config = _supcon_config(make_config, teacher_run)
    straight = quiet(config, tmp_path / "straight")
    straight.run()
    steps = len(straight._loader(0))
    trainer = quiet(config, tmp_path / "stopped")
    stop_at_batch(trainer, steps + 1)  # inside the second epoch
    with pytest.raises(TrainingInterrupted):
        trainer.run()
    resume_run(tmp_path / "stopped", progress=False, log=lambda _: None)
    a = torch.load(tmp_path / "straight" / "model" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "stopped" / "model" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    last_a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["connectors"]
    last_b = load_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.pt")["connectors"]
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)
