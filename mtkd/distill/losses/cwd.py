"""Channel-wise distillation (CWD; Shu et al., ICCV 2021) of segmentation logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtkd.distill.losses.output import softened_logits


def cwd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0
) -> torch.Tensor:
    """Channel-wise KL(teacher || student) of spatial distributions, times temperature^2.

    For each image and channel, the logits z / T are turned into a distribution over the
    spatial positions (softmax over all voxels of that channel); the KL divergence from the
    teacher's to the student's distribution is summed over positions and averaged over
    channels and images. One-channel (sigmoid) logits are handled the same way over their
    single channel. The teacher logits are detached and resized (linear interpolation) to the
    student's spatial size when they differ. Computed in float32; returns a scalar.
    """
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        z_s, z_t = softened_logits(student_logits, teacher_logits, temperature, "CWD")
        log_p_s = F.log_softmax(z_s.flatten(2), dim=2)
        log_p_t = F.log_softmax(z_t.flatten(2), dim=2)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=2)  # (B, C)
        return kl.mean() * temperature**2
