"""The anchor to the parent version: the model a run was fine-tuned from, as a second,
output-level teacher.

Fine-tuning on new cases forgets what was learned from the old ones. The anchor keeps the
student's outputs near its parent's: the per-voxel KL of temperature-softened outputs
(:func:`mtkd.distill.losses.pmd_loss`, Hinton's KD per voxel) between the frozen parent and the
student, on every training sample, labelled or not. Like the Distiller's teacher, the parent is
kept out of the module tree (no parameters, no ``state_dict`` entries, nothing for
DistributedDataParallel to synchronise), stays in eval mode and runs under ``torch.no_grad()``;
``.to()`` still moves it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mtkd.distill.losses import pmd_loss
from mtkd.models.taps import first_tensor

__all__ = ["ANCHOR_TERM", "ParentAnchor"]

ANCHOR_TERM = "anchor"  # the term's name in the run's loss terms (events, plots)


class ParentAnchor(nn.Module):
    """The frozen ``parent`` network and the weight and temperature of its term.

    ``in_channels``: the channels the parent takes (the CT channel of the input is repeated
    to them; None: the student's). ``record``: what the run's lineage says of the parent.
    """

    def __init__(
        self,
        parent: nn.Module,
        weight: float,
        temperature: float,
        *,
        in_channels: int | None = None,
        record: dict[str, Any] | None = None,
    ):
        super().__init__()
        parent.eval()
        for parameter in parent.parameters():
            parameter.requires_grad_(False)
        self._frozen = [parent]  # out of the module tree
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.in_channels = in_channels
        self.record = dict(record or {})

    @property
    def parent(self) -> nn.Module:
        return self._frozen[0]

    def parent_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The parent's logits (B, C, *spatial) for images (B, C_in, *spatial), no gradient."""
        channels = self.in_channels
        if channels is not None and channels != images.shape[1]:
            images = images[:, :1].expand(images.shape[0], channels, *images.shape[2:])
        with torch.no_grad():
            return first_tensor(self.parent(images)).detach()

    def forward(self, images: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        """The unweighted term: KL(parent || student) of the softened outputs, times T^2."""
        return pmd_loss(student_logits, self.parent_logits(images), self.temperature)

    def train(self, mode: bool = True) -> ParentAnchor:
        """The parent stays in eval mode whatever the run's mode."""
        super().train(mode)
        self.parent.eval()
        return self

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):
        if recurse:
            self.parent._apply(fn)
        return super()._apply(fn, recurse)
