"""The loss of one training batch, as a module, so that DistributedDataParallel can wrap it.

DDP synchronises the gradients of the module it wraps during backward; the whole per-batch
computation (student, frozen teacher, connectors, losses) is therefore one ``forward`` here.
The same module runs unwrapped in a single process.

A batch may mix labelled and unlabelled samples (``has_label``): the segmentation loss is the
loss over the labelled ones only (0, with a gradient path, when there are none); the
distillation terms cover every sample, and the supervised ones (``supcon``) see the labels of
unlabelled samples as :data:`IGNORE_LABEL`.

A sample may also leave structures unannotated (``annotated``, (B, K + 1) bool): the
segmentation loss masks them (:mod:`mtkd.engine.seg_loss`), and the supervised distillation
terms see its background voxels, which may be such a structure, as :data:`IGNORE_LABEL`.

With ``distill.anchor`` the parent version adds its term (:mod:`mtkd.distill.anchor`) on the
student's logits of every sample, whatever the rest of the loss.
"""

from __future__ import annotations

import torch
from torch import nn

from mtkd.distill.anchor import ANCHOR_TERM, ParentAnchor
from mtkd.distill.distiller import Distiller
from mtkd.engine.seg_loss import SegmentationLoss
from mtkd.engine.teacher_source import pseudo_logits
from mtkd.infer.inference import first_output

__all__ = ["IGNORE_LABEL", "TrainingStep", "labelled_seg_loss"]

IGNORE_LABEL = -1  # the label value the distiller's supervised terms never sample


def labelled_seg_loss(
    seg_loss: nn.Module,
    logits: torch.Tensor,
    labels: torch.Tensor,
    has_label: torch.Tensor | None = None,
    annotated: torch.Tensor | None = None,
) -> torch.Tensor:
    """``seg_loss`` of logits (B, C, *S) against labels (B, 1, *S) over the samples whose
    ``has_label`` (B,) bool is True (all when None): the same value as the loss of the batch
    of those samples alone. No labelled sample: 0 (float32), still connected to ``logits``.
    ``annotated`` (B, C) bool: the structures each sample annotates (None: all)."""
    extra = {} if annotated is None else {"annotated": annotated}
    if has_label is None:
        return seg_loss(logits, labels, **extra)
    has_label = has_label.to(logits.device, torch.bool)
    if bool(has_label.all()):
        return seg_loss(logits, labels, **extra)
    if not bool(has_label.any()):
        return logits.float().sum() * 0.0
    if annotated is not None:
        extra = {"annotated": annotated.to(logits.device)[has_label]}
    return seg_loss(logits[has_label], labels[has_label], **extra)


def _ignore_unknown(
    labels: torch.Tensor, has_label: torch.Tensor | None, annotated: torch.Tensor | None
) -> torch.Tensor:
    """labels (B, 1, *S) with every voxel of the unlabelled samples, and the background voxels
    of the samples that leave a structure unannotated, set to IGNORE_LABEL."""
    shape = (-1,) + (1,) * (labels.ndim - 1)
    if has_label is not None:
        unlabelled = ~has_label.to(labels.device, torch.bool)
        if bool(unlabelled.any()):
            labels = labels.masked_fill(unlabelled.view(shape), IGNORE_LABEL)
    if annotated is not None:
        partial = ~annotated.to(labels.device, torch.bool)[:, 1:].all(1)
        if bool(partial.any()):
            labels = labels.masked_fill(partial.view(shape) & (labels == 0), IGNORE_LABEL)
    return labels


class TrainingStep(nn.Module):
    """Loss and its unweighted terms for one batch.

    ``model`` is a :class:`Distiller` (distillation), or the network itself (plain training,
    or multi-task training when ``reconstruction`` is "masked" or "unmasked": the network's
    ``multitask_losses`` give the segmentation and the reconstruction loss, over the whole
    image or, with ``reconstruction_loss_on`` "masked", over the masked patches only).
    ``anchor`` (:class:`ParentAnchor`): the parent version's term on the student's logits of
    every sample, added with its weight and logged as the term "anchor".
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
        reconstruction_loss_on: str = "all",
        anchor: ParentAnchor | None = None,
        teacher_maps: str = "probabilities",
    ):
        super().__init__()
        self.model = model
        self.seg_loss = seg_loss
        self.seg_weight = seg_weight
        self.activation = activation
        self.reconstruction = reconstruction
        self.reconstruction_weight = reconstruction_weight
        self.reconstruction_loss_on = reconstruction_loss_on  # "all" or "masked" (MAE)
        self.anchor = anchor  # the parent version as a second teacher (None: none)
        # the batches' teacher maps: stored probabilities, or precomputed logits
        self.teacher_maps = teacher_maps

    def forward(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
        teacher: torch.Tensor | None = None,
        has_label: torch.Tensor | None = None,
        subject: torch.Tensor | None = None,
        annotated: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """images (B, C, *S), labels (B, 1, *S) class indices 0..K and, from stored teacher
        outputs, the teacher's probabilities (B, K + 1, *S) (with ``teacher_maps`` "logits",
        its precomputed logits (B, C, *S)) -> (loss, detached terms).

        ``has_label`` (B,) bool: which samples' labels are real (None: all); the others' are
        placeholders, left out of the segmentation loss. The labels also go to the distiller,
        for its supervised (``supcon``) terms; ``generator`` draws the masks of masked
        reconstruction. ``subject`` (B,) int64, the patient of each sample, goes to the
        distiller (InfoNCE without same-subject negatives). ``annotated`` (B, K + 1) bool:
        the structures each sample annotates (None: all; see the module docstring).
        """
        loss, terms, logits = self._losses(images, labels, generator, teacher, has_label,
                                           subject, annotated)  # fmt: skip
        if self.anchor is not None:
            term = self.anchor(images, logits)
            loss = loss + self.anchor.weight * term
            terms[ANCHOR_TERM] = term.detach()
        return loss, terms

    def _losses(self, images, labels, generator, teacher, has_label, subject, annotated):
        """The loss, its unweighted terms and the student's logits, without the anchor."""
        if isinstance(self.model, Distiller):
            supervised = _ignore_unknown(labels, has_label, annotated)
            stored = None  # a teacher network computes its own logits
            if self.model.teacher is None and self.teacher_maps == "logits":
                stored = teacher
            elif self.model.teacher is None:
                stored = pseudo_logits(teacher, self.activation)
            out = self.model(images, stored, labels=supervised, subject=subject)
            logits = out.student_logits
            seg = labelled_seg_loss(self.seg_loss, logits, labels, has_label, annotated)
            terms = {"seg": seg.detach(), **{k: v.detach() for k, v in out.terms.items()}}
            return self.seg_weight * seg + out.loss, terms, logits
        if self.reconstruction != "none":
            outputs, rec = self.model.multitask_losses(
                images, generator=generator, loss_on=self.reconstruction_loss_on
            )
            logits = first_output(outputs)
            seg = labelled_seg_loss(self.seg_loss, logits, labels, has_label, annotated)
            loss = self.seg_weight * seg + self.reconstruction_weight * rec
            return loss, {"seg": seg.detach(), "reconstruction": rec.detach()}, logits
        logits = first_output(self.model(images))
        seg = labelled_seg_loss(self.seg_loss, logits, labels, has_label, annotated)
        return self.seg_weight * seg, {"seg": seg.detach()}, logits
