"""lmtrain.training.optim: the learning-rate schedule as a pure function of the step; the optimizer choice."""

from __future__ import annotations

import math

import pytest
import torch

from lmtrain.config import ConfigError
from lmtrain.model.language_model import LanguageModel
from lmtrain.training.optim import build_optimizer, learning_rate


def lr_at(step: int, **options) -> float:
    defaults = dict(lr=1.0, schedule="constant", warmup_steps=0, total_steps=None, min_lr=0.0)
    return learning_rate(step, **{**defaults, **options})


def test_constant_stays():
    assert [lr_at(step, lr=0.3) for step in (0, 1, 10, 10**6)] == [0.3] * 4
    assert lr_at(500, lr=0.3, total_steps=100) == 0.3  # constant ignores total_steps


def test_warmup_is_linear_and_reaches_lr():
    rates = [lr_at(step, lr=0.8, warmup_steps=4) for step in range(7)]
    assert rates[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8], rel=1e-15)
    assert rates[3] == 0.8 and rates[4:] == [0.8, 0.8, 0.8]
    differences = [b - a for a, b in zip(rates, rates[1:4])]
    assert differences == pytest.approx([0.2] * 3, rel=1e-12)


def test_warmup_then_cosine():
    options = dict(lr=1.0, schedule="cosine", warmup_steps=10, total_steps=110, min_lr=0.1)
    assert lr_at(0, **options) == pytest.approx(0.1, rel=1e-15)   # lr / warmup_steps
    assert lr_at(9, **options) == 1.0
    assert lr_at(10, **options) == pytest.approx(1.0, rel=1e-15)  # cosine starts at lr
    assert lr_at(60, **options) == pytest.approx(0.55, rel=1e-14)  # half way: the mean of lr and min_lr
    assert lr_at(110, **options) == 0.1


def test_cosine_from_lr_to_min_lr():
    options = dict(lr=2e-3, schedule="cosine", warmup_steps=0, total_steps=100, min_lr=1e-4)
    assert lr_at(0, **options) == pytest.approx(2e-3, rel=1e-15)
    assert lr_at(100, **options) == 1e-4
    for step in range(101):
        expected = 1e-4 + 0.5 * (2e-3 - 1e-4) * (1 + math.cos(math.pi * step / 100))
        assert lr_at(step, **options) == pytest.approx(expected, rel=1e-14)
    # Continuous at the end: one step before is within a hair of min_lr.
    assert lr_at(99, **options) - 1e-4 == pytest.approx(0.5 * 1.9e-3 * (1 - math.cos(math.pi / 100)), rel=1e-9)


def test_cosine_monotone_after_warmup():
    options = dict(lr=1.0, schedule="cosine", warmup_steps=5, total_steps=57, min_lr=0.05)
    rates = [lr_at(step, **options) for step in range(5, 80)]
    assert all(b <= a for a, b in zip(rates, rates[1:]))
    assert all(0.05 <= rate <= 1.0 for rate in rates)


@pytest.mark.parametrize("step", [100, 101, 1000, 10**9])
def test_cosine_past_the_end_is_min_lr(step: int):
    assert lr_at(step, lr=1.0, schedule="cosine", total_steps=100, min_lr=0.01) == 0.01


def test_cosine_without_total_steps_is_min_lr():
    assert lr_at(3, lr=1.0, schedule="cosine", total_steps=None, min_lr=0.2) == 0.2


def test_cosine_with_warmup_as_long_as_training():
    # total_steps == warmup_steps: no division by zero; min_lr after warmup.
    options = dict(lr=1.0, schedule="cosine", warmup_steps=10, total_steps=10, min_lr=0.0)
    assert lr_at(9, **options) == 1.0
    assert lr_at(10, **options) == 0.0


def tiny_model(**kwargs) -> LanguageModel:
    return LanguageModel(7, embed_size=4, hidden_size=4, num_layers=1, **kwargs)


@pytest.mark.parametrize("name, kind", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                        ("sgd", torch.optim.SGD)])
def test_build_optimizer(config_factory, name: str, kind: type):
    config = config_factory(**{"train.optimizer": name, "train.lr": 0.05, "train.weight_decay": 0.01,
                               "train.momentum": 0.9})
    optimizer = build_optimizer(tiny_model(), config.train)
    assert type(optimizer) is kind
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.05 and group["weight_decay"] == 0.01
    if name == "sgd":
        assert group["momentum"] == 0.9
    else:
        assert group["fused"]  # torch's one-kernel Adam on the CPU


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_a_step_refreshes_the_cached_stacked_weights(config_factory, name: str):
    """Evaluation and sampling use the cells' cached weight stack, kept until a parameter's version
    changes; the fused Adam kernel does not bump versions itself, so build_optimizer makes it."""
    model = tiny_model()
    optimizer = build_optimizer(model, config_factory(**{"train.optimizer": name, "train.lr": 0.1}).train)
    cell = model.rnn.layers[0].cell
    with torch.no_grad():
        before = [t.clone() for t in cell.stacked_weights()]
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    with torch.no_grad():
        after = cell.stacked_weights()
        assert not any(torch.equal(a, b) for a, b in zip(before, after))
        assert all(torch.equal(a, b) for a, b in zip(after, cell._stack()))


@pytest.mark.parametrize("name, kind", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_fused_adam_takes_the_for_loop_implementations_steps(config_factory, name: str, kind: type):
    """The fused kernel computes Adam's update as torch's for-loop implementation does, to float rounding."""
    config = config_factory(**{"train.optimizer": name, "train.lr": 0.05, "train.weight_decay": 0.01})
    fused_model, loop_model = tiny_model(), tiny_model()
    loop_model.load_state_dict(fused_model.state_dict())
    fused = build_optimizer(fused_model, config.train)
    loop = kind(loop_model.parameters(), lr=0.05, weight_decay=0.01, foreach=False)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        for a, b in zip(fused_model.parameters(), loop_model.parameters()):
            a.grad = torch.randn(a.shape, generator=generator)
            b.grad = a.grad.clone()
        fused.step()
        loop.step()
    for a, b in zip(fused_model.parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_tied_weight_appears_once(config_factory):
    model = tiny_model(tie_weights=True)
    optimizer = build_optimizer(model, config_factory().train)
    parameters = optimizer.param_groups[0]["params"]
    assert len(parameters) == len({id(p) for p in parameters}) == len(list(model.parameters()))
    assert any(p is model.embedding.weight for p in parameters)


def test_step_schedule_is_zaremba_halving():
    """configs/ptb-small.yaml: lr 20 for 4 epochs of 2,324 steps, then halved every epoch."""
    zaremba = dict(lr=20.0, schedule="step", decay_start=9296, decay_every=2324, decay_rate=0.5)
    assert lr_at(0, **zaremba) == lr_at(9295, **zaremba) == 20.0
    assert lr_at(9296, **zaremba) == lr_at(9296 + 2323, **zaremba) == 10.0
    assert lr_at(9296 + 2324, **zaremba) == 5.0
    assert lr_at(13 * 2324 - 1, **zaremba) == pytest.approx(20.0 / 2 ** 9)  # the last epoch: Zaremba's 1/512, x20
    assert lr_at(10**6, **zaremba, min_lr=0.1) == 0.1


def test_step_schedule_after_warmup():
    options = dict(lr=1.0, schedule="step", warmup_steps=4, decay_start=6, decay_every=2, decay_rate=0.1)
    assert [lr_at(step, **options) for step in range(10)] == pytest.approx(
        [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


@pytest.mark.parametrize(("key", "value"), [("train.decay_rate", 0.0), ("train.decay_rate", 1.5),
                                            ("train.decay_every", 0), ("train.decay_start", -1)])
def test_step_schedule_bad_values(config_factory, key: str, value):
    with pytest.raises(ConfigError, match=key):
        config_factory(**{key: value})


def test_cosine_over_time_follows_the_time_spent():
    """`train.max_seconds` alone: the cosine's progress is the training time spent over the budget."""
    options = dict(lr=1.0, schedule="cosine", total_steps=None, min_lr=0.0)
    assert lr_at(10, **options, time_fraction=0.0) == 1.0
    assert lr_at(10, **options, time_fraction=0.5) == pytest.approx(0.5)
    assert lr_at(10, **options, time_fraction=1.0) == 0.0
    assert lr_at(10, **options, time_fraction=1.7) == 0.0


def test_cosine_follows_whichever_budget_is_further_along():
    options = dict(lr=1.0, schedule="cosine", total_steps=100, min_lr=0.0)
    assert lr_at(50, **options, time_fraction=0.1) == pytest.approx(0.5)    # the steps are further along
    assert lr_at(10, **options, time_fraction=0.5) == pytest.approx(0.5)    # the time is


def test_a_warmup_longer_than_the_epochs_budget_is_warned_of_once_an_epoch_is_known():
    from lmtrain.config import TrainConfig
    from lmtrain.training.optim import warmup_past_epochs

    budget = TrainConfig(max_steps=None, max_epochs=2, warmup_steps=50)
    assert warmup_past_epochs(budget, per_epoch=20) == (
        "warning: train.warmup_steps 50 is more than the 40 steps of train.max_epochs 2 (20 an epoch): the learning "
        "rate never reaches train.lr")
    assert warmup_past_epochs(budget, per_epoch=25) is None  # reached on the last step
    assert warmup_past_epochs(TrainConfig(max_steps=None, max_epochs=None, warmup_steps=50), per_epoch=1) is None
    # max_steps nearer and shorter than the warmup: the config's own warning says it, once
    assert warmup_past_epochs(TrainConfig(max_steps=30, max_epochs=2, warmup_steps=50), per_epoch=20) is None
