"""One source of defaults: a model built through the Python API with no options is the model a config
with no `model` section builds, on the route `lmtrain train` takes; `model.init: auto` follows the
optimizer."""

from __future__ import annotations

import inspect

import pytest
import torch

from lmtrain.config import ModelConfig, TrainConfig, initialisation
from lmtrain.evaluation.interop import from_torch
from lmtrain.model.cells import GRUCell, LSTMCell, make_cell
from lmtrain.model.language_model import LanguageModel
from lmtrain.model.layers import BidirectionalLayer, RecurrentLayer, RecurrentStack

CONFIG = ModelConfig()
RESOLVED_INIT, RESOLVED_FORGET_BIAS = initialisation(CONFIG.init, CONFIG.forget_bias, optimizer=TrainConfig.optimizer)
# A constructor argument that is not named as its config key.
KEY_OF = {"reset": "gru_reset"}


def defaults(function) -> dict:
    return {name: parameter.default for name, parameter in inspect.signature(function).parameters.items()
            if parameter.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("constructor", [LanguageModel, RecurrentStack, RecurrentLayer, BidirectionalLayer],
                         ids=lambda c: c.__name__)
def test_every_constructor_default_is_the_config_default(constructor):
    shared = {name: value for name, value in defaults(constructor).items() if name in vars(CONFIG)}
    assert shared, "the constructor shares no key with the config"
    for name, value in shared.items():
        assert value == getattr(CONFIG, name), f"{constructor.__name__}({name}={value!r}) but model.{name} is " \
                                               f"{getattr(CONFIG, name)!r}"


@pytest.mark.parametrize("constructor", [LSTMCell, GRUCell, make_cell], ids=lambda c: c.__name__)
def test_the_cells_defaults_are_the_resolved_config_defaults(constructor):
    """A cell takes the concrete values a default config builds with (forget_bias: auto is None with Adam)."""
    resolved = {**vars(CONFIG), "forget_bias": RESOLVED_FORGET_BIAS}
    for name, value in defaults(constructor).items():
        key = KEY_OF.get(name, name)
        if key in resolved:
            assert value == resolved[key], f"{constructor.__name__}({name}={value!r})"


def test_the_api_model_is_the_cli_model():
    """Same architecture, same route (the hand-written backward), same initialisation scheme."""
    from lmtrain.config import build_config

    config = build_config({"data.path": "/corpus.txt", "train.max_steps": 1})
    torch.manual_seed(0)
    from_config = LanguageModel.from_config(config.model, 50)
    torch.manual_seed(0)
    plain = LanguageModel(50)
    assert str(from_config) == str(plain)
    for (name, a), (_, b) in zip(from_config.state_dict().items(), plain.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert all(layer.gradients == "manual" for layer in plain.rnn.layers)
    assert len(plain.rnn.layers) == CONFIG.num_layers == 2


def test_from_torch_runs_the_hand_written_backpropagation():
    stack = from_torch(torch.nn.LSTM(3, 4, num_layers=2, batch_first=True)).stack
    assert all(layer.gradients == CONFIG.gradients == "manual" for layer in stack.layers)


@pytest.mark.parametrize("optimizer, init, forget_bias", [("adam", "torch", None), ("adamw", "torch", None),
                                                          ("sgd", "zaremba", 1.0)])
def test_init_auto_follows_the_optimizer(optimizer, init, forget_bias):
    from lmtrain.config import build_config

    config = build_config({"data.path": "/corpus.txt", "train.max_steps": 1, "train.optimizer": optimizer})
    assert (config.model.init, config.model.forget_bias) == (init, forget_bias)
    explicit = build_config({"data.path": "/c.txt", "train.max_steps": 1, "train.optimizer": optimizer,
                             "model.init": "zaremba", "model.forget_bias": 0.5})
    assert (explicit.model.init, explicit.model.forget_bias) == ("zaremba", 0.5)
    torch_init = build_config({"data.path": "/c.txt", "train.max_steps": 1, "model.init": "torch"})
    assert torch_init.model.forget_bias is None
