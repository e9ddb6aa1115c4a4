"""The loss of one training batch, as a module, so that DistributedDataParallel can wrap it.

DDP synchronises the gradients of the module it wraps during backward; the whole per-batch
computation (student, frozen teacher, connectors, losses) is therefore one ``forward`` here.
The same module runs unwrapped in a single process.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from mtkd.distill.distiller import Distiller
from mtkd.engine.seg_loss import SegmentationLoss
from mtkd.engine.teacher_source import pseudo_logits
from mtkd.infer.inference import first_output

__all__ = ["TrainingStep"]


class TrainingStep(nn.Module):
    """Loss and its unweighted terms for one batch.

    ``model`` is a :class:`Distiller` (distillation), or the network itself (plain training,
    or multi-task training when ``reconstruction`` is "masked" or "unmasked": the network's
    ``multitask_outputs`` give the segmentation and the reconstruction of the input).
    """

    def __init__(
        self,
        model: nn.Module,
        seg_loss: SegmentationLoss,
        *,
        seg_weight: float,
        activation: str,
        reconstruction: str = "none",
        reconstruction_weight: float = 0.0,
    ):
        super().__init__()
        self.model = model
        self.seg_loss = seg_loss
        self.seg_weight = seg_weight
        self.activation = activation
        self.reconstruction = reconstruction
        self.reconstruction_weight = reconstruction_weight

    def forward(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
        teacher: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """images (B, C, *S), labels (B, 1, *S) class indices 0..K and, from stored teacher
        outputs, the teacher's probabilities (B, K + 1, *S) -> (loss, detached terms).

        The labels also go to the distiller, for its supervised (``supcon``) terms;
        ``generator`` draws the masks of masked reconstruction.
        """
        if isinstance(self.model, Distiller):
            if self.model.teacher is None:
                out = self.model(images, pseudo_logits(teacher, self.activation), labels=labels)
            else:
                out = self.model(images, labels=labels)
            seg = self.seg_loss(out.student_logits, labels)
            terms = {"seg": seg.detach(), **{k: v.detach() for k, v in out.terms.items()}}
            return self.seg_weight * seg + out.loss, terms
        if self.reconstruction != "none":
            logits, reconstruction, target = self.model.multitask_outputs(
                images, generator=generator
            )
            seg = self.seg_loss(first_output(logits), labels)
            rec = F.mse_loss(reconstruction.float(), target.float())
            loss = self.seg_weight * seg + self.reconstruction_weight * rec
            return loss, {"seg": seg.detach(), "reconstruction": rec.detach()}
        seg = self.seg_loss(first_output(self.model(images)), labels)
        return self.seg_weight * seg, {"seg": seg.detach()}
