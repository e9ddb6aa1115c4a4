"""What trains a run's networks: the optimiser, its schedule, the AMP gradient scaler and the
per-batch training step (wrapped in DistributedDataParallel under torchrun)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch.nn.parallel import DistributedDataParallel

from mtkd.config import RunConfig
from mtkd.engine.optim import build_optimizer, build_scheduler
from mtkd.engine.seg_loss import SegmentationLoss
from mtkd.engine.setup_models import RunModels
from mtkd.engine.step import TrainingStep

__all__ = ["Optimisation", "build_optimisation"]


class Optimisation(NamedTuple):
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a torch LR scheduler, or None for a constant rate
    scaler: torch.amp.GradScaler  # enabled for float16 autocast on CUDA only
    step: torch.nn.Module  # TrainingStep, or DistributedDataParallel around it


def build_optimisation(
    config: RunConfig, models: RunModels, activation: str, device: torch.device, ddp: bool
) -> Optimisation:
    """The optimiser of the student (and the distiller's connectors), its schedule, the
    gradient scaler and the training step; ``ddp``: wrap the step for torchrun."""
    distiller, network = models.distiller, models.network
    trainable = distiller.trainable_parameters() if distiller else network.parameters()
    optimizer = build_optimizer(config.train, trainable)
    scheduler = build_scheduler(config.train, optimizer)
    use_scaler = device.type == "cuda" and config.train.amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    step = TrainingStep(
        distiller or network,
        SegmentationLoss(config.train.seg_loss, activation),
        seg_weight=config.train.seg_weight,
        activation=activation,
        reconstruction=models.spec["reconstruction"],
        reconstruction_weight=config.multitask.weight,
        reconstruction_loss_on=config.multitask.reconstruction_loss_on,
        anchor=models.anchor,
        teacher_maps=models.teacher_maps,
    )
    if ddp:
        # every trainable parameter is used by every step (Testing/engine/test_distributed.py), so
        # DDP needs no search for unused ones
        device_ids = [device.index] if device.type == "cuda" else None
        step = DistributedDataParallel(step, device_ids=device_ids)
    return Optimisation(optimizer, scheduler, scaler, step)
