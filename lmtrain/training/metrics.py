"""What a run reports: one JSON object per event in metrics.jsonl (and, with `train.tensorboard`, the same
numbers to TensorBoard), and the small pure functions behind its progress lines."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmtrain.config import ModelConfig
from lmtrain.errors import LmtrainError, os_reason
from lmtrain.evaluation.perplexity import perplexity
from lmtrain.files import strict_json
from lmtrain.training.rundir import RunDirectory

TENSORBOARD = ("loss", "ppl", "lr", "tokens_per_s")  # the event fields also sent to TensorBoard


def event(*, step: int, split: str, loss: float | None, lr: float, tokens_per_s: float, elapsed_seconds: float,
          threads: int | None, skipped: int = 0) -> dict[str, Any]:
    """One line of metrics.jsonl. Strict JSON: a non-finite number (a diverged loss) is null, not NaN or
    Infinity, which JSON lacks. `skipped`: the steps of the window that were skipped as non-finite (then a
    `skipped` field); `loss` is the mean over the others, None (null) when there were none."""
    values = {"step": step, "split": split, "loss": None if loss is None else round(loss, 6),
              "ppl": None if loss is None else round(perplexity(loss), 4), "lr": lr,
              "tokens_per_s": round(tokens_per_s, 1), "elapsed_s": round(elapsed_seconds, 3), "threads": threads}
    if skipped:
        values["skipped"] = skipped
    return strict_json(values)


class Metrics:
    """metrics.jsonl of a run folder, opened for this run (`resumed_at`: the events after that step, from a
    run that died before its next checkpoint, are dropped), and TensorBoard's log beside it if asked for."""

    def __init__(self, run_dir: RunDirectory, *, resumed_at: int | None, tensorboard: bool,
                 warn: Callable[[str], None] = lambda line: None) -> None:
        self.path = run_dir.metrics
        self.file, self.logged_at_resume = run_dir.open_metrics(resumed_at=resumed_at, warn=warn)
        self.resumed_at = resumed_at
        self.summary = summary_writer_class()(log_dir=str(Path(run_dir.path) / "tensorboard")) if tensorboard else None

    def write(self, values: dict[str, Any]) -> None:
        """Append one event. An evaluation redone at the step a run resumed from (a finished run resumed, or
        one stopped during its final evaluation) is logged there already, with the same numbers: not twice."""
        if values["step"] == self.resumed_at and values["split"] in self.logged_at_resume:
            return
        try:
            self.file.write(json.dumps(values, allow_nan=False) + "\n")
            self.file.flush()
        except OSError as error:
            raise LmtrainError(f"cannot write {self.path}: {os_reason(error)}") from None
        if self.summary is not None:
            for name in TENSORBOARD:
                if values[name] is not None:
                    self.summary.add_scalar(f"{name}/{values['split']}", values[name], values["step"])

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:  # a full disk, said already by the write that failed
            pass
        if self.summary is not None:
            self.summary.close()


def summary_writer_class() -> type:
    """TensorBoard's SummaryWriter, or a clear error when the optional package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise LmtrainError("train.tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def time_left(*, step: int, total_steps: int | None, train_seconds: float, max_seconds: float | None,
              seconds_per_step: float) -> float | None:
    """Seconds of training left: to the time budget, or through the steps left at the recent pace,
    whichever ends first; None when neither limit is set."""
    left = []
    if max_seconds is not None:
        left.append(max(0.0, max_seconds - train_seconds))
    if total_steps is not None:
        left.append(max(0, total_steps - step) * seconds_per_step)
    return min(left) if left else None


def duration(seconds: float) -> str:
    """`42 s`, `3 min 5 s`, `2 h 7 min`."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


@dataclass
class Window:
    """The good training steps since the last progress line: their summed NLL (kept as a tensor on the
    model's device, read once a line rather than once a step), tokens, seconds and count; and the count of
    the steps skipped as non-finite, which add only their seconds."""
    loss: Tensor | float = 0.0
    tokens: int = 0
    seconds: float = 0.0
    steps: int = 0
    skipped: int = 0

    @property
    def mean_loss(self) -> float:
        return float(self.loss) / max(self.tokens, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def progress_line(*, step: int, total_steps: int | None, loss: float | None, lr: float, tokens_per_s: float,
                  elapsed_seconds: float, left: float | None, skipped: int = 0) -> str:
    """The line printed every `train.log_every` steps where no progress bar is drawn; `loss` is None when
    all the steps since the last line were skipped."""
    return (f"step {step:,}{f'/{total_steps:,}' if total_steps else ''}: "
            + (f"loss {loss:.3f}" if loss is not None else "no loss")
            + (f" ({skipped} step{'s' if skipped > 1 else ''} skipped)" if skipped else "") + f", lr {lr:.2e}, "
            f"{tokens_per_s:,.0f} tokens/s, {duration(elapsed_seconds)} elapsed"
            + (f", {duration(left)} left" if left is not None else ""))


def run_line(model: ModelConfig, *, parameters: int, vocab_size: int, per_epoch: int, device: torch.device,
             threads: str, processes: int) -> str:
    """The line a run starts with: the model, its data, and where it runs."""
    return (f"model: {model.cell} {model.num_layers}x{model.hidden_size}, {parameters:,} parameters, vocabulary "
            f"{vocab_size:,}, {per_epoch:,} batches per epoch, device {device}"
            + (f", {threads}" if device.type == "cpu" else "")
            + (f", {processes} processes" if processes > 1 else "")
            + (", with a right-to-left LM (direction: bi)" if model.direction == "bi" else ""))
