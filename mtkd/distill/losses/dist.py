"""DIST (Huang et al., NeurIPS 2022): relation-based distillation of class probabilities."""

from __future__ import annotations

import torch

from mtkd.distill.losses.output import softened_logits

_EPS = 1e-8
# The weights of the inter- and intra-class relation terms: 1 and 1, the paper's setting.
DIST_BETA = 1.0
DIST_GAMMA = 1.0


def pearson(a: torch.Tensor, b: torch.Tensor, dim: int, eps: float = _EPS) -> torch.Tensor:
    """Pearson correlation of ``a`` and ``b`` along ``dim`` (that axis is reduced).

    The product of the two norms of the centred vectors is kept >= ``eps``, so a constant
    vector gives a correlation of 0 and a finite gradient instead of NaN.
    """
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    norms = ((a * a).sum(dim=dim) * (b * b).sum(dim=dim)).clamp_min(eps * eps).sqrt()
    return (a * b).sum(dim=dim) / norms


def _probabilities(z: torch.Tensor) -> torch.Tensor:
    """Class probabilities (B, C, N) of softened logits; one channel -> [1 - p, p]."""
    z = z.flatten(2)
    if z.shape[1] == 1:
        p = torch.sigmoid(z)
        return torch.cat([1.0 - p, p], dim=1)
    return torch.softmax(z, dim=1)


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    beta: float = DIST_BETA,
    gamma: float = DIST_GAMMA,
) -> torch.Tensor:
    """T^2 * (beta * inter + gamma * intra) of temperature-softened class probabilities.

    inter: 1 - Pearson correlation between the student's and teacher's class-probability
    vectors (softmax over C of z / T) at each voxel, averaged over voxels and images.
    intra: 1 - Pearson correlation, for each class, between the student's and teacher's
    probabilities over all voxels of the batch, averaged over classes. One-channel (sigmoid)
    logits use the two-class probabilities [1 - p, p]. The teacher logits are detached and
    resized (linear interpolation) to the student's spatial size when they differ. Computed in
    float32; returns a scalar.

    This is the segmentation form of the authors' code (hunto/DIST_KD, segmentation/losses):
    voxels play the role of the images of a classification batch. With one channel, the
    inter-class term compares two-element vectors, whose correlation is only ever -1, 0 or 1:
    it has no gradient, and the intra-class term carries the whole signal.
    """
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        z_s, z_t = softened_logits(student_logits, teacher_logits, temperature, "DIST")
        p_s, p_t = _probabilities(z_s), _probabilities(z_t)  # (B, C, N)
        inter = (1.0 - pearson(p_s, p_t, dim=1)).mean()
        classes = p_s.shape[1]
        p_s = p_s.transpose(0, 1).reshape(classes, -1)  # (C, B * N)
        p_t = p_t.transpose(0, 1).reshape(classes, -1)
        intra = (1.0 - pearson(p_s, p_t, dim=1)).mean()
        return (beta * inter + gamma * intra) * temperature**2
