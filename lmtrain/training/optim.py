"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from lmtrain.config import TrainConfig
from lmtrain.speed.torch_internals import increment_version

# Where torch has a fused Adam kernel: one pass per parameter instead of about ten tensor operations
# each, several times faster (docs/benchmarks.md, "The optimizer step"). SGD is one operation per
# parameter already.
FUSED_DEVICES = ("cpu", "cuda")


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    parameters = list(model.parameters())  # a tied weight appears once
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    optimizer = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    fused = all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in parameters)
    built = optimizer(parameters, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None)
    if fused:
        # The fused kernel writes the parameters without bumping their version counters, and
        # `Cell.stacked_weights` keys its no-grad cache on them: evaluation would see stale weights.
        built.register_step_post_hook(lambda *_: increment_version(parameters))
    return built


def learning_rate(step: int, *, lr: float, schedule: str, warmup_steps: int, total_steps: int | None,
                  min_lr: float = 0.0, decay_start: int = 0, decay_every: int = 1, decay_rate: float = 1.0,
                  time_fraction: float | None = None) -> float:
    """The learning rate for optimizer step `step` (0-based). A pure function of the step (and, for a
    cosine over a time budget, of the time spent), so a resumed run follows the same curve without
    saved scheduler state.

    1) linear warmup from lr/warmup_steps to lr over the first `warmup_steps` steps;
    2) then `constant`: lr; or `cosine`: from lr down to min_lr at `total_steps` (Loshchilov & Hutter
       2017, without restarts), min_lr past it; when `time_fraction` (training time spent / allowed)
       is given, the cosine follows whichever of the step and time budgets is further along; or `step`:
       lr until `decay_start`, then multiplied by `decay_rate` there and again every `decay_every`
       steps, never below min_lr (Zaremba et al. 2014 halve the rate every epoch after the fourth).
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "step":
        decays = (step - decay_start) // decay_every + 1 if step >= decay_start else 0
        return max(min_lr, lr * decay_rate ** decays)
    fractions = [] if time_fraction is None else [time_fraction]
    if total_steps is not None:
        fractions.append(1.0 if step >= total_steps else (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if not fractions:
        return min_lr
    progress = min(1.0, max(fractions))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def gradient_norm(model: torch.nn.Module, *, clip: float) -> torch.Tensor:
    """The global gradient norm, clipped to `clip` first when `clip > 0` (Pascanu et al. 2013)."""
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
