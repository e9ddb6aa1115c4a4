"""Image-level InfoNCE between student and teacher feature maps (the MTMS-CKD contrastive term)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtkd.errors import MTKDError


def infonce_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.4
) -> torch.Tensor:
    """InfoNCE over the images of a batch.

    Each map (B, C, *spatial) is flattened to one L2-normalised vector per image, giving
    z_s and z_t of shape (B, C * prod(spatial)). With logits = z_s z_t^T / temperature (B, B),
    the loss is the cross-entropy with the diagonal as targets: the positive of student image i
    is teacher image i, the negatives are the other teacher images of the batch.

    Args:
        student: aligned student features (B, C, *spatial).
        teacher: aligned teacher features, same shape as ``student``.
        temperature: softmax temperature tau > 0 (0.4 in the paper).

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
        return F.cross_entropy(logits, targets)
