"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from lmtrain.config import TrainConfig


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    parameters = list(model.parameters())  # a tied weight appears once
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    optimizer = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return optimizer(parameters, lr=config.lr, weight_decay=config.weight_decay)


def learning_rate(step: int, *, lr: float, schedule: str, warmup_steps: int, total_steps: int | None,
                  min_lr: float = 0.0) -> float:
    """The learning rate for optimizer step `step` (0-based). A pure function of the step, so a
    resumed run follows the same curve without saved scheduler state.

    1) linear warmup from lr/warmup_steps to lr over the first `warmup_steps` steps;
    2) then `constant`: lr, or `cosine`: from lr down to min_lr at `total_steps`
       (Loshchilov & Hutter 2017, without restarts);
    3) past `total_steps`, min_lr.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if total_steps is None or step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
