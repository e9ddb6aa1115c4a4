"""Optimisers and learning-rate schedules from the training recipe."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from mtkd.config import TrainConfig


def build_optimizer(
    train: TrainConfig, parameters: Iterable[nn.Parameter]
) -> torch.optim.Optimizer:
    """The configured optimiser over the trainable ``parameters``."""
    opt = train.optimizer
    parameters = [p for p in parameters if p.requires_grad]
    if opt.name == "adamw":
        return torch.optim.AdamW(parameters, lr=opt.lr, weight_decay=opt.weight_decay)
    if opt.name == "adam":
        return torch.optim.Adam(parameters, lr=opt.lr, weight_decay=opt.weight_decay)
    if opt.name == "sgd":
        return torch.optim.SGD(
            parameters,
            lr=opt.lr,
            momentum=opt.momentum,
            weight_decay=opt.weight_decay,
            nesterov=opt.momentum > 0,
        )
    return torch.optim.RMSprop(
        parameters, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay
    )


def build_scheduler(train: TrainConfig, optimizer: torch.optim.Optimizer) -> LRScheduler | None:
    """A per-epoch learning-rate schedule (None for a constant rate)."""
    epochs = train.epochs
    if train.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if train.scheduler == "poly":
        return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=epochs, power=0.9)
    return None
