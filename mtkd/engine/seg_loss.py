"""The supervised segmentation loss, for softmax (multi-class) or sigmoid (one structure), with
structures a case does not annotate masked out.

A structure nobody drew in a case (``not_annotated``, :mod:`mtkd.data.partial_labels`) leaves
its voxels labelled 0 there, so "background" in that case means "background or that
structure". Counting those voxels as background would teach the network to miss the structure.
The softmax loss is therefore the *marginal* loss of partially labelled segmentation: per case,
the probabilities of background and of every structure the case does not annotate are summed
into one class, and a voxel labelled 0 is scored against that sum:

- cross-entropy at a voxel labelled 0 is ``-log(p_background + sum of p_unannotated)``; at a
  voxel of an annotated structure it is unchanged, ``-log p_structure``;
- Dice is computed per case and channel as MONAI's ``DiceLoss`` does, with the summed
  probability in channel 0; the channels of unannotated structures are left out of the mean.

Moving probability between background and an unannotated structure at a background voxel
changes nothing, and an annotated structure's Dice and its voxels' cross-entropy are what they
are with every structure annotated. Where every structure is annotated the loss is MONAI's
``DiceCELoss`` (``DiceLoss``, cross-entropy) itself. With a sigmoid output (one structure) a
case that does not annotate it has no label: it is left out like an unlabelled sample.
"""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss, DiceLoss
from torch import nn
from torch.nn import functional as F

__all__ = ["SegmentationLoss", "marginal_terms"]

_SMOOTH = 1e-5  # MONAI DiceLoss's smooth_nr and smooth_dr


def marginal_terms(
    logits: torch.Tensor, labels: torch.Tensor, annotated: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The marginal loss's terms (see the module docstring) of softmax logits (B, C, *S)
    against labels (B, 1, *S) in 0..C-1, with ``annotated`` (B, C) bool (channel 0 ignored).

    Returns the Dice loss per case and channel (B, C), NaN where a channel is not annotated,
    and the cross-entropy per voxel (B, *S)."""
    annotated = annotated.to(logits.device, torch.bool).clone()
    annotated[:, 0] = True
    merged = ~annotated
    merged[:, 0] = True  # background and the unannotated structures, summed
    spatial = (1,) * (logits.ndim - 2)
    log_p = F.log_softmax(logits.float(), dim=1)
    hidden = torch.finfo(log_p.dtype).min
    log_merged = log_p.masked_fill(~merged.view(*merged.shape, *spatial), hidden)
    log_q = torch.cat([torch.logsumexp(log_merged, 1, keepdim=True), log_p[:, 1:]], 1)
    target = labels[:, 0].long()
    ce = -log_q.gather(1, target.unsqueeze(1))[:, 0]
    q = log_q.exp()
    one_hot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(q.dtype)
    dims = tuple(range(2, logits.ndim))
    intersection = (q * one_hot).sum(dims)
    denominator = q.sum(dims) + one_hot.sum(dims)
    dice = 1.0 - (2.0 * intersection + _SMOOTH) / (denominator + _SMOOTH)
    return dice.masked_fill(~annotated, float("nan")), ce


class SegmentationLoss(nn.Module):
    """Dice + cross-entropy (or either alone) of logits (B, C, *S) against labels (B, 1, *S).

    softmax: C = K + 1 classes, labels 0..K; sigmoid: C = 1, labels 0/1. ``annotated`` (B, C)
    bool, optional: which structures each case annotates (channel 0 ignored); see the module
    docstring for how the others are masked.
    """

    def __init__(self, kind: str, activation: str):
        super().__init__()
        self.kind = kind
        self.sigmoid = activation == "sigmoid"
        options = {"sigmoid": True} if self.sigmoid else {"softmax": True, "to_onehot_y": True}
        if kind == "dice_ce":
            self.loss = DiceCELoss(**options)
        elif kind == "dice":
            self.loss = DiceLoss(**options)
        else:
            self.loss = None

    def forward(
        self, logits: torch.Tensor, labels: torch.Tensor, annotated: torch.Tensor | None = None
    ) -> torch.Tensor:
        logits = logits.float()
        if annotated is not None:
            annotated = annotated.to(logits.device, torch.bool)
            if self.sigmoid:
                keep = annotated[:, 0]
                if not bool(keep.all()):
                    if not bool(keep.any()):
                        return logits.sum() * 0.0
                    logits, labels = logits[keep], labels[keep]
            elif not bool(annotated[:, 1:].all()):
                return self._marginal(logits, labels, annotated)
        target = labels.float() if self.sigmoid else labels
        if self.loss is not None:
            return self.loss(logits, target)
        if self.sigmoid:
            return F.binary_cross_entropy_with_logits(logits, target)
        return F.cross_entropy(logits, labels[:, 0])

    def _marginal(
        self, logits: torch.Tensor, labels: torch.Tensor, annotated: torch.Tensor
    ) -> torch.Tensor:
        dice, ce = marginal_terms(logits, labels, annotated)
        dice = dice[~dice.isnan()].mean()
        if self.kind == "dice_ce":
            return dice + ce.mean()
        return dice if self.kind == "dice" else ce.mean()
