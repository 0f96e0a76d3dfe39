"""lmtrain.model.objective: what a training step minimises, both LMs of a `bi` model in one call."""

from __future__ import annotations

import pytest
import torch

from lmtrain.model.language_model import LanguageModel
from lmtrain.model.objective import Objective
from lmtrain.model.regularization import activation_penalty

IGNORE = -100


def batch(seed: int, *, rows: int = 3, steps: int = 5, vocab: int = 11, padded: bool = False):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randint(2, vocab, (rows, steps), generator=generator)
    targets = torch.randint(2, vocab, (rows, steps), generator=generator)
    if padded:
        targets[0, 3:] = IGNORE  # a shorter first sentence
    return inputs, targets


@pytest.mark.parametrize("direction", ["forward", "bi"])
@pytest.mark.parametrize("padded", [False, True])
def test_the_loss_is_the_mean_over_the_lms_of_their_nll_per_token_and_penalty(direction: str, padded: bool):
    torch.manual_seed(0)
    model = LanguageModel(11, cell="gru", embed_size=6, hidden_size=7, direction=direction, dropout=0.0)
    objective = Objective(model, ignore_index=IGNORE, activation_regularization=0.5,
                          temporal_activation_regularization=0.25, padded=padded)
    batches = [batch(seed, padded=padded) for seed in range(len(model.directions))]
    tokens = [7.0, 9.0][:len(model.directions)]
    loss, summed, states = objective(batches, [None] * len(batches), tokens)

    expected, expected_sum = [], 0.0
    for right_to_left, (inputs, targets), count in zip(model.directions, batches, tokens):
        nll, state, (a, a_dropped) = model(inputs, targets=targets, ignore_index=IGNORE, right_to_left=right_to_left,
                                           hidden=True)
        mask = (targets != IGNORE).float() if padded else None
        expected.append(nll / count + activation_penalty(a, a_dropped, mask, alpha=0.5, beta=0.25))
        expected_sum += float(nll.detach())
    assert len(states) == len(model.directions)
    torch.testing.assert_close(loss, sum(expected) / len(expected))
    assert float(summed) == pytest.approx(expected_sum)
    assert not summed.requires_grad and loss.requires_grad


def test_one_batch_and_state_per_lm():
    model = LanguageModel(11, cell="rnn", embed_size=4, hidden_size=5, direction="bi")
    objective = Objective(model, ignore_index=IGNORE)
    with pytest.raises(ValueError):  # a bi model's objective needs both LMs' batches
        objective([batch(0)], [None], [1.0])
