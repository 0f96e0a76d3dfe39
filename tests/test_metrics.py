"""lmtrain.training.metrics and the small pure functions the training loop reads its limits from."""

from __future__ import annotations

import pytest
import torch

from lmtrain.config import ModelConfig, TrainConfig
from lmtrain.training.metrics import Window, duration, progress_line, run_line, time_left
from lmtrain.training.optim import learning_rate, scheduled_rate, total_steps
from lmtrain.training.resume import Progress


def test_a_window_reads_its_mean_loss_and_speed():
    window = Window(loss=torch.tensor(30.0), tokens=10, seconds=0.5, steps=2)
    assert window.mean_loss == 3.0 and window.tokens_per_s == 20.0
    assert Window().mean_loss == 0.0 and Window().tokens_per_s == 0.0  # no step yet: no division by zero


def test_progress_line():
    line = progress_line(step=1200, total_steps=5000, loss=2.34567, lr=0.001, tokens_per_s=12345.6,
                         elapsed_seconds=65, left=3700)
    assert line == "step 1,200/5,000: loss 2.346, lr 1.00e-03, 12,346 tokens/s, 1 min 5 s elapsed, 1 h 1 min left"
    assert progress_line(step=3, total_steps=None, loss=1.0, lr=0.1, tokens_per_s=1.0, elapsed_seconds=1,
                         left=None) == "step 3: loss 1.000, lr 1.00e-01, 1 tokens/s, 1 s elapsed"


def test_run_line_names_the_model_and_where_it_runs():
    line = run_line(ModelConfig(cell="gru", num_layers=2, hidden_size=64, direction="bi"), parameters=12345,
                    vocab_size=50, per_epoch=7, device=torch.device("cpu"), threads="2 threads", processes=1)
    assert line == ("model: gru 2x64, 12,345 parameters, vocabulary 50, 7 batches per epoch, device cpu, 2 threads, "
                    "with a right-to-left LM (direction: bi)")
    assert ", 4 processes" in run_line(ModelConfig(), parameters=1, vocab_size=3, per_epoch=1,
                                       device=torch.device("cpu"), threads="1 thread", processes=4)


@pytest.mark.parametrize(("max_steps", "max_epochs", "expected"), [(None, None, None), (100, None, 100),
                                                                   (None, 3, 30), (100, 3, 30), (20, 3, 20)])
def test_total_steps_is_the_nearer_limit(max_steps, max_epochs, expected):
    assert total_steps(TrainConfig(max_steps=max_steps, max_epochs=max_epochs), per_epoch=10) == expected


def test_scheduled_rate_passes_the_run_settings_and_the_time_fraction():
    config = TrainConfig(lr=0.1, schedule="cosine", warmup_steps=0, max_steps=None, max_seconds=100.0, min_lr=0.0)
    assert scheduled_rate(config, step=5, train_seconds=50.0, total_steps=None) == pytest.approx(
        learning_rate(5, lr=0.1, schedule="cosine", warmup_steps=0, total_steps=None, time_fraction=0.5))
    assert scheduled_rate(config, step=5, train_seconds=50.0, total_steps=None) == pytest.approx(0.05)


@pytest.mark.parametrize(("progress", "expected"), [
    (Progress(step=9, epoch=0, train_seconds=1.0), None),
    (Progress(step=10), "max_steps"),
    (Progress(step=1, epoch=2), "max_epochs"),
    (Progress(step=1, train_seconds=60.0), "max_seconds"),
])
def test_stop_reason(progress: Progress, expected):
    assert progress.stop_reason(TrainConfig(max_steps=10, max_epochs=2, max_seconds=60.0)) == expected


def test_time_left_and_duration():
    assert time_left(step=10, total_steps=20, train_seconds=5, max_seconds=None, seconds_per_step=0.5) == 5.0
    assert time_left(step=10, total_steps=None, train_seconds=5, max_seconds=None, seconds_per_step=0.5) is None
    assert [duration(s) for s in (42, 185, 7620)] == ["42 s", "3 min 5 s", "2 h 7 min"]
