"""The supervised segmentation loss, for softmax (multi-class) or sigmoid (one structure)."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss, DiceLoss
from torch import nn
from torch.nn import functional as F


class SegmentationLoss(nn.Module):
    """Dice + cross-entropy (or either alone) of logits (B, C, *S) against labels (B, 1, *S).

    softmax: C = K + 1 classes, labels 0..K; sigmoid: C = 1, labels 0/1.
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

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        target = labels.float() if self.sigmoid else labels
        if self.loss is not None:
            return self.loss(logits, target)
        if self.sigmoid:
            return F.binary_cross_entropy_with_logits(logits, target)
        return F.cross_entropy(logits, labels[:, 0])
