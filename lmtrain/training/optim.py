"""Optimizer, learning-rate schedule, and whether the model and its optimizer state fit in memory."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from lmtrain.config import Config, TrainConfig
from lmtrain.model.language_model import check_size, parameter_estimate
from lmtrain.speed.memory import available_bytes
from lmtrain.speed.torch_internals import increment_version

# Where torch has a fused Adam kernel: one pass per parameter instead of about ten tensor operations
# each, several times faster (docs/benchmarks.md, "The optimizer step"). SGD is one operation per
# parameter already.
FUSED_DEVICES = ("cpu", "cuda")
# A vocabulary past this gets a warning: the softmax over it then dominates time and memory.
LARGE_VOCABULARY = 200_000


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


def total_steps(config: TrainConfig, per_epoch: int) -> int | None:
    """The steps a run takes if no time budget stops it first: the nearer of max_steps and max_epochs."""
    limits = [config.max_steps, config.max_epochs and config.max_epochs * per_epoch]
    return min((limit for limit in limits if limit), default=None)


def warmup_past_epochs(config: TrainConfig, per_epoch: int) -> str | None:
    """A warning where train.max_epochs ends the run before its warmup does, found once the steps of an
    epoch are known (a warmup beyond train.max_steps is the config's own warning)."""
    if not config.max_epochs or config.max_steps is not None and config.warmup_steps > config.max_steps:
        return None
    steps = config.max_epochs * per_epoch
    if config.warmup_steps <= steps:
        return None
    return (f"warning: train.warmup_steps {config.warmup_steps} is more than the {steps:,} steps of train.max_epochs "
            f"{config.max_epochs} ({per_epoch:,} an epoch): the learning rate never reaches train.lr")


def scheduled_rate(config: TrainConfig, *, step: int, train_seconds: float, total_steps: int | None) -> float:
    """`learning_rate` with a run's `train.*` settings."""
    return learning_rate(step, lr=config.lr, schedule=config.schedule, warmup_steps=config.warmup_steps,
                         total_steps=total_steps, min_lr=config.min_lr, decay_start=config.decay_start,
                         decay_every=config.decay_every, decay_rate=config.decay_rate,
                         time_fraction=train_seconds / config.max_seconds if config.max_seconds else None)


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


def check_fits(config: Config, vocab_size: int, *, device: torch.device, warn: Callable[[str], None]) -> None:
    """Refuse a model that cannot fit (weights, gradients and the optimizer's state), before allocating
    it; warn of a vocabulary so large that the output layer dominates every step."""
    state = {"adam": 2, "adamw": 2, "sgd": 1 if config.train.momentum else 0}[config.train.optimizer]
    check_size(config.model, vocab_size, bytes_per_parameter=4 * (2 + state),
               available=available_bytes() if device.type == "cpu" else None)
    if vocab_size > LARGE_VOCABULARY:
        output = parameter_estimate(config.model, vocab_size)["output"]
        warn(f"warning: a vocabulary of {vocab_size:,} tokens: the output layer alone has {output:,} parameters, "
             f"and every step makes batch x bptt x {vocab_size:,} logits; data.min_freq or data.max_vocab keep the "
             f"frequent words (PTB keeps 10,000)")
