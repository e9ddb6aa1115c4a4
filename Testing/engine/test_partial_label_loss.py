"""The segmentation loss with structures a case does not annotate: masked, not taught as
background, and the annotated structures' terms untouched."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss, DiceLoss

from mtkd.engine.seg_loss import SegmentationLoss, marginal_terms
from mtkd.engine.step import TrainingStep

LIVER, SPLEEN, KIDNEY = 1, 2, 3  # channels; 0 is background


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (2, 4, 6, 7, 5) and labels (2, 1, 6, 7, 5) with every class present in sample 0;
    the spleen of sample 1 erased (as where nobody drew it)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, 6, 7, 5, generator=generator) * 2
    labels = torch.randint(0, 4, (2, 1, 6, 7, 5), generator=generator)
    labels[1][labels[1] == SPLEEN] = 0
    return logits, labels


def spleen_unknown_in_sample_1() -> torch.Tensor:
    annotated = torch.ones(2, 4, dtype=torch.bool)
    annotated[1, SPLEEN] = False
    return annotated


@pytest.mark.parametrize(
    ("kind", "monai_loss"),
    [("dice_ce", DiceCELoss), ("dice", DiceLoss), ("ce", None)],
)
def test_every_structure_annotated_is_monais_loss(kind, monai_loss):
    logits, labels = batch()
    all_annotated = torch.ones(2, 4, dtype=torch.bool)
    dice, ce = marginal_terms(logits, labels, all_annotated)
    if monai_loss is not None:
        expected = monai_loss(softmax=True, to_onehot_y=True)(logits, labels)
    else:
        expected = torch.nn.functional.cross_entropy(logits, labels[:, 0])
    own = {"dice_ce": dice.mean() + ce.mean(), "dice": dice.mean(), "ce": ce.mean()}[kind]
    assert torch.allclose(own, expected, atol=1e-5)
    loss = SegmentationLoss(kind, "softmax")
    assert torch.equal(loss(logits, labels, all_annotated), loss(logits, labels))


def test_not_annotated_is_not_annotated_as_empty():
    logits, labels = batch()
    loss = SegmentationLoss("dice_ce", "softmax")
    unknown = loss(logits, labels, spleen_unknown_in_sample_1())
    empty = loss(logits, labels)  # the erased spleen read as "no spleen here"
    assert not torch.isclose(unknown, empty)
    # where sample 1's background voxels may be spleen: moving probability between background
    # and spleen there changes nothing when the spleen is not annotated...
    moved = logits.clone()
    background = labels[1, 0] == 0
    low = torch.minimum(logits[1, 0], logits[1, SPLEEN])[background]
    high = torch.maximum(logits[1, 0], logits[1, SPLEEN])[background]
    moved[1, 0][background], moved[1, SPLEEN][background] = low, high  # the spleen takes the
    # larger share of the two; their sum stays the same
    assert not torch.equal(moved, logits)
    assert torch.isclose(loss(moved, labels, spleen_unknown_in_sample_1()), unknown, atol=1e-5)
    # ...and is punished when the empty map is taken for the truth
    assert loss(moved, labels) > empty + 0.01


def test_annotated_structures_terms_do_not_change():
    logits, labels = batch()
    full_dice, full_ce = marginal_terms(logits, labels, torch.ones(2, 4, dtype=torch.bool))
    dice, ce = marginal_terms(logits, labels, spleen_unknown_in_sample_1())
    assert torch.equal(dice[0], full_dice[0]) and torch.equal(ce[0], full_ce[0])  # sample 0
    for channel in (LIVER, KIDNEY):  # sample 1's annotated structures
        assert torch.allclose(dice[1, channel], full_dice[1, channel])
        drawn = labels[1, 0] == channel
        assert torch.allclose(ce[1][drawn], full_ce[1][drawn])
    assert torch.isnan(dice[1, SPLEEN])  # the unannotated one is out of the mean
    background = labels[1, 0] == 0
    assert (ce[1][background] <= full_ce[1][background] + 1e-6).all()
    assert (ce[1][background] < full_ce[1][background] - 1e-3).any()


def test_gradients_never_push_an_unannotated_structure_down_at_background():
    def spleen_gradient(annotated: torch.Tensor | None) -> torch.Tensor:
        logits, labels = batch()
        logits.requires_grad_(True)
        SegmentationLoss("ce", "softmax")(logits, labels, annotated).backward()
        return logits.grad[1, SPLEEN][labels[1, 0] == 0]

    # gradient descent moves along -grad: a positive gradient lowers the spleen's logit
    assert (spleen_gradient(spleen_unknown_in_sample_1()) <= 0).all()
    assert (spleen_gradient(None) > 0).all()  # annotated as empty: pushed down everywhere


def test_sigmoid_case_without_its_structure_is_left_out():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 1, 5, 5, 5, generator=generator)
    labels = torch.randint(0, 2, (2, 1, 5, 5, 5), generator=generator)
    loss = SegmentationLoss("dice_ce", "sigmoid")
    annotated = torch.tensor([[True], [False]])
    assert torch.allclose(loss(logits, labels, annotated), loss(logits[:1], labels[:1]))
    nothing = loss(logits, labels, torch.tensor([[False], [False]]))
    assert nothing.item() == 0.0


def test_training_step_passes_the_mask_to_the_loss():
    torch.manual_seed(0)
    network = torch.nn.Conv3d(1, 4, 1)
    step = TrainingStep(network, SegmentationLoss("dice_ce", "softmax"), seg_weight=1.0,
                        activation="softmax")  # fmt: skip
    images = torch.randn(2, 1, 6, 7, 5)
    _, labels = batch()
    masked, _ = step(images, labels, annotated=spleen_unknown_in_sample_1())
    plain, _ = step(images, labels, annotated=torch.ones(2, 4, dtype=torch.bool))
    expected = SegmentationLoss("dice_ce", "softmax")(
        network(images), labels, spleen_unknown_in_sample_1()
    )
    assert torch.allclose(masked, expected) and not torch.isclose(masked, plain)
    only_first, _ = step(
        images, labels, has_label=torch.tensor([True, False]),
        annotated=spleen_unknown_in_sample_1(),
    )  # fmt: skip
    alone = SegmentationLoss("dice_ce", "softmax")(network(images[:1]), labels[:1])
    assert torch.allclose(only_first, alone)
