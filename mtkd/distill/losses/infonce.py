"""Image-level InfoNCE between student and teacher feature maps (the MTMS-CKD contrastive term)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtkd.errors import MTKDError

# Which teacher images are an anchor's negatives: every other image of the batch (the paper),
# or only those of other subjects (neighbouring slices of one patient are not pushed apart).
NEGATIVES = ("batch", "other_subjects")


def check_subject(subject: torch.Tensor, batch: int) -> torch.Tensor:
    """``subject`` as an int64 (B,) tensor of subject indices; MTKDError if it is not one."""
    if not isinstance(subject, torch.Tensor) or tuple(subject.shape) != (batch,):
        shape = tuple(subject.shape) if isinstance(subject, torch.Tensor) else type(subject)
        raise MTKDError(
            f"InfoNCE without same-subject negatives needs one subject index per image, a "
            f"tensor of shape ({batch},), got {shape}"
        )
    if subject.is_floating_point() or subject.is_complex() or subject.dtype == torch.bool:
        raise MTKDError(f"InfoNCE subject indices must be integers, got {subject.dtype}")
    return subject.long()


def infonce_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 0.4,
    subject: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE over the images of a batch.

    Each map (B, C, *spatial) is flattened to one L2-normalised vector per image, giving
    z_s and z_t of shape (B, C * prod(spatial)). With logits = z_s z_t^T / temperature (B, B),
    the loss is the cross-entropy with the diagonal as targets: the positive of student image i
    is teacher image i, the negatives are the other teacher images of the batch.

    With ``subject`` (B,) integer subject (patient) indices, the negatives of image i are only
    the teacher images of *other* subjects: the other images of i's own subject are left out of
    its softmax (neither positive nor negative). An image whose batch holds no other subject
    has no negative and is left out of the mean; when no image has one (the whole batch is one
    subject) the loss is 0, with a gradient path and no NaN. Without ``subject``, or when all
    subjects differ, it is the plain batch InfoNCE.

    Args:
        student: aligned student features (B, C, *spatial).
        teacher: aligned teacher features, same shape as ``student``.
        temperature: softmax temperature tau > 0 (0.4 in the paper).
        subject: optional (B,) integer subject index of each image.

    Returns:
        A float32 scalar. Works for any batch size >= 2 (no state kept between calls).
    """
    if student.shape != teacher.shape:
        raise MTKDError(
            f"InfoNCE needs aligned feature maps of the same shape, got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )
    if temperature <= 0:
        raise MTKDError(f"InfoNCE temperature must be > 0, got {temperature}")
    batch = student.shape[0]
    if batch < 2:
        raise MTKDError(
            f"InfoNCE needs at least 2 images per batch (the other images are the negatives), "
            f"got a batch of {batch}; use a larger batch size, drop the last incomplete batch "
            f"(drop_last), or use the 'mse' or 'cosine' feature loss"
        )
    with torch.autocast(device_type=student.device.type, enabled=False):
        z_s = F.normalize(student.reshape(batch, -1).float(), dim=1)
        z_t = F.normalize(teacher.reshape(batch, -1).float(), dim=1)
        logits = z_s @ z_t.T / temperature
        targets = torch.arange(batch, device=logits.device)
        if subject is None:
            return F.cross_entropy(logits, targets)
        subject = check_subject(subject, batch).to(logits.device)
        same = subject[:, None] == subject[None, :]  # (B, B), the diagonal included
        usable = (~same).any(dim=1)  # anchors with at least one negative
        if not bool(usable.any()):
            return (z_s.sum() + z_t.sum()) * 0.0
        excluded = same & ~torch.eye(batch, dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(excluded, float("-inf"))
        return F.cross_entropy(logits[usable], targets[usable])
