"""lmtrain.model.language_model: shapes, the zero input x(1) = 0, tied weights, and that a tiny model can learn."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from lmtrain.config import ConfigError
from lmtrain.data.tokenizer import ZERO_INPUT, Tokenizer
from lmtrain.model.cells import LSTMCell, make_cell
from lmtrain.model.language_model import LanguageModel
from lmtrain.model.layers import RecurrentLayer, RecurrentStack, manual_layer

V = 11


def make(**kwargs) -> LanguageModel:
    options = dict(cell="lstm", embed_size=6, hidden_size=8, num_layers=2)
    return LanguageModel(V, **{**options, **kwargs}).double()


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_logits_shape_and_state(cell: str):
    model = make(cell=cell)
    tokens = torch.randint(0, V, (3, 5))
    logits, state = model(tokens)
    assert logits.shape == (3, 5, V) and logits.dtype == torch.float64
    assert len(state) == 2
    assert all(t.shape == (3, 8) for layer in state for t in layer)


def test_forward_equals_stack_by_hand():
    model = make(num_layers=1, cell="gru")
    tokens = torch.tensor([[ZERO_INPUT, 3, 4, 1]])
    logits, _ = model(tokens)
    x = model.embedding.weight[[0, 3, 4, 1]].unsqueeze(0).clone()
    x[0, 0] = 0.0
    a, _ = model.rnn(x)
    torch.testing.assert_close(logits, a @ model.projection.weight.T + model.projection.bias, rtol=1e-12, atol=1e-12)


def test_state_carried_across_calls():
    model = make()
    tokens = torch.randint(0, V, (2, 9))
    whole, _ = model(tokens)
    first, state = model(tokens[:, :4])
    second, _ = model(tokens[:, 4:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-12, atol=1e-12)


def test_zero_input_is_a_zero_embedding():
    model = make()
    tokens = torch.tensor([[ZERO_INPUT, 3, 4], [ZERO_INPUT, ZERO_INPUT, 2]])
    before, _ = model(tokens)
    with torch.no_grad():
        model.embedding.weight[0] += 5.0   # the row ZERO_INPUT would read if it were clamped to id 0
    after, _ = model(tokens)
    assert torch.equal(before, after)


def test_output_at_zero_input_ignores_every_embedding():
    model = make()
    tokens = torch.tensor([[ZERO_INPUT, 3, 4]])
    before, _ = model(tokens)
    with torch.no_grad():
        model.embedding.weight.normal_()
    after, _ = model(tokens)
    assert torch.equal(before[:, 0], after[:, 0])       # from a(0) = 0 and x(1) = 0 only
    assert not torch.equal(before[:, 1], after[:, 1])   # reads the embedding of token 3
    # ... and equals the logits of a model fed a zero vector directly.
    a, _ = model.rnn(torch.zeros(1, 1, 6, dtype=torch.float64))
    torch.testing.assert_close(after[:, 0], model.projection(a)[:, 0], rtol=1e-12, atol=1e-12)


def test_token_zero_is_not_the_zero_input():
    model = make()
    zero_input, _ = model(torch.tensor([[ZERO_INPUT]]))
    unk, _ = model(torch.tensor([[0]]))
    assert not torch.equal(zero_input, unk)


def test_tie_weights_shares_one_parameter():
    model = LanguageModel(V, embed_size=8, hidden_size=8, tie_weights=True)
    assert model.projection.weight is model.embedding.weight
    names = [name for name, _ in model.named_parameters()]
    assert "projection.weight" not in names  # listed once
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for n, p in model.named_parameters(remove_duplicate=False) if n != "projection.weight")
    untied = LanguageModel(V, embed_size=8, hidden_size=8)
    assert untied.projection.weight is not untied.embedding.weight


def test_from_config(config_factory):
    config = config_factory(**{"model.cell": "gru", "model.relevance_gate": False, "model.embed_size": 5,
                               "model.hidden_size": 7, "model.num_layers": 3, "model.dropout": 0.25})
    model = LanguageModel.from_config(config.model, V)
    assert model.embedding.num_embeddings == V and model.embedding.embedding_dim == 5
    assert len(model.rnn.layers) == 3
    assert all(layer.cell.hidden_size == 7 and layer.cell.relevance_gate is False for layer in model.rnn.layers)
    assert model.input_dropout.p == model.output_dropout.p == model.rnn.dropout.p == 0.25
    assert model.projection.out_features == V


def test_initialisation():
    # Zaremba et al. 2014 / pytorch word_language_model: U(-0.1, 0.1) embedding and projection, zero bias.
    model = LanguageModel(50, embed_size=16, hidden_size=16, init="zaremba")
    for weight in (model.embedding.weight, model.projection.weight):
        assert weight.abs().max() <= 0.1 and weight.std() > 0.03
    assert torch.equal(model.projection.bias, torch.zeros(50))


def test_initial_state():
    model = make()
    state = model.initial_state(4, dtype=torch.float64)
    assert len(state) == 2 and all(torch.equal(t, torch.zeros(4, 8, dtype=torch.float64)) for s in state for t in s)


def test_tiny_model_overfits_a_short_text():
    text = "the quick brown fox jumps over\n"  # 31 chars; every next char follows from the context
    tokenizer = Tokenizer.fit(text, level="char")
    ids = torch.tensor([tokenizer.eos_id, *tokenizer.encode(text * 2)])
    inputs, targets = ids[:-1].unsqueeze(0), ids[1:].unsqueeze(0)
    model = LanguageModel(tokenizer.vocab_size, cell="lstm", embed_size=16, hidden_size=48, num_layers=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(200):
        logits, _ = model(inputs)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        logits, _ = model(inputs)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
    assert loss.item() < 0.1
    # After the first line the model knows every next character.
    assert torch.equal(logits[0, len(text):].argmax(-1), targets[0, len(text):])


def test_torch_initialisation_and_forget_bias():
    """`model.init: torch`: nn.Embedding's N(0, 1) and nn.Linear's U(-1/sqrt(H), 1/sqrt(H)) with its bias;
    `model.forget_bias: null`: b_f drawn like every other bias, a number: that constant."""
    torch.manual_seed(0)
    model = LanguageModel(500, embed_size=16, hidden_size=64, num_layers=2, init="torch", forget_bias=None)
    assert 0.9 < float(model.embedding.weight.detach().std()) < 1.1
    bound = 1 / 64 ** 0.5
    assert (float(model.projection.weight.detach().abs().max()) <= bound
            and float(model.projection.bias.detach().abs().max()) > 0)
    for layer in model.rnn.layers:
        assert float(layer.cell.b_f.detach().abs().max()) <= bound and float(layer.cell.b_f.detach().std()) > 0
    model = LanguageModel(50, embed_size=8, hidden_size=8, num_layers=1, forget_bias=0.5)
    assert torch.equal(model.rnn.layers[0].cell.b_f, torch.full((8,), 0.5))
    # auto: torch's initialisation and b_f like the other biases; with Zaremba's, a forget bias of 1
    assert not torch.equal(LanguageModel(50, embed_size=8, hidden_size=8).rnn.layers[0].cell.b_f, torch.ones(8))
    zaremba = LanguageModel(50, embed_size=8, hidden_size=8, init="zaremba")
    assert torch.equal(zaremba.rnn.layers[0].cell.b_f, torch.ones(8))
    assert float(zaremba.embedding.weight.detach().abs().max()) <= 0.1


def test_init_from_config_and_bad_init(config_factory):
    config = config_factory(**{"model.init": "torch", "model.forget_bias": None, "model.embed_size": 8})
    model = LanguageModel.from_config(config.model, 300)
    assert (float(model.embedding.weight.detach().abs().max()) > 0.5
            and float(model.rnn.layers[0].cell.b_f.detach().abs().max()) < 0.1)
    with pytest.raises(ConfigError, match="model.init must be one of auto, zaremba, torch"):
        config_factory(**{"model.init": "xavier"})


@pytest.mark.parametrize("arguments, message", [
    ({"hidden_size": 0}, "hidden_size must be positive; got 0"),
    ({"num_layers": 0}, "num_layers must be positive; got 0"),
    ({"cell": "lstms"}, "cell must be one of rnn, gru, lstm; got 'lstms'"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\); got 1.0"),
    ({"output_dropout": float("nan")}, "output_dropout must be a finite number; got nan"),
    ({"tie_weights": True}, "tie_weights needs embed_size == hidden_size; got 6 and 8"),
    ({"cell": "gru", "gru_reset": "after", "relevance_gate": False}, "gru_reset: after needs relevance_gate"),
    ({"forget_bias": "one"}, "forget_bias must be a number, null or auto; got 'one'"),
    ({"init": "xavier"}, "init must be one of auto, zaremba, torch; got 'xavier'"),
    ({"vocab_size": 0}, "vocab_size must be a positive integer; got 0"),
    ({"tie_weights": "false"}, "tie_weights must be true or false; got 'false'"),
    ({"hidden_size": "8"}, "hidden_size must be an integer; got '8'"),
    ({"embed_size": 6.5}, "embed_size must be an integer; got 6.5"),
])
def test_the_constructor_refuses_what_a_config_would_naming_the_argument(arguments, message):
    """The Python API's checks are the config's, each message naming the argument as the call spelled it."""
    with pytest.raises(ValueError, match=f"^{message}"):
        LanguageModel(**{"vocab_size": V, "embed_size": 6, "hidden_size": 8, **arguments})


def test_numpy_numbers_are_taken_as_python_numbers():
    numpy = pytest.importorskip("numpy")
    model = LanguageModel(numpy.int64(V), embed_size=numpy.int32(6), hidden_size=numpy.int64(8),
                          dropout=numpy.float32(0.25))
    assert model.rnn.layers[0].cell.input_size == 6 and type(model.rnn.layers[0].cell.hidden_size) is int
    assert model.output_dropout.p == 0.25 and model(torch.randint(0, V, (2, 3)))[0].shape == (2, 3, V)


def test_numpy_bools_are_taken_as_python_bools():
    numpy = pytest.importorskip("numpy")
    model = LanguageModel(V, embed_size=8, hidden_size=8, tie_weights=numpy.True_)
    assert model.projection.weight is model.embedding.weight
    stack = RecurrentStack("gru", 4, 4, bidirectional=numpy.bool_(True), relevance_gate=numpy.False_)
    assert stack.layers[0].left_to_right_layer.cell.gates == ("u", "c")


def test_the_gru_cells_refusals_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"^gru_reset 'after' needs relevance_gate=True"):
        make_cell("gru", 5, 6, gru_reset="after", relevance_gate=False)
    with pytest.raises(ValueError, match=r"^gru_reset must be 'before' or 'after'; got 'later'"):
        make_cell("gru", 5, 6, gru_reset="later")
    with pytest.raises(ValueError, match=r"^gradients must be one of manual, autograd; got 'foo'"):
        RecurrentStack("lstm", 4, 4, gradients="foo")


def test_a_state_that_is_not_the_layers_is_refused_naming_it():
    """A state of another batch size was read past its end by the compiled loops (a crash or wrong numbers)."""
    model = LanguageModel(V, embed_size=6, hidden_size=8, num_layers=1)
    tokens = torch.randint(0, V, (3, 5))
    _, one_row = model(tokens[:1])
    with pytest.raises(ValueError, match=r"state must be the LSTMCell's \(a, c\), each \(3, 8\) torch.float32"):
        model(tokens, one_row)
    with pytest.raises(ValueError, match=r"state must hold one entry per layer \(1\); got 2 entries"):
        model(tokens, one_row * 2)
    with pytest.raises(ValueError, match=r"token ids must be in 0..10 \(or -1, the zero input\); got 11"):
        model(torch.tensor([[3, 11]]))
    with pytest.raises(ValueError, match=r"token ids must be in 0..10 \(or -1, the zero input\); got -5"):
        model(torch.tensor([[-5, 3]]))  # read as <unk> before
    with pytest.raises(ValueError, match=r"tokens must be a tensor of int64 or int32 ids; got torch.float32"):
        model(tokens.float())
    with pytest.raises(ValueError, match=r"targets must have the tokens' shape \(3, 5\), a target per token; got"):
        model(tokens, targets=tokens[:, 1:])
    with pytest.raises(ValueError, match=r"x must be a floating-point tensor \(batch, time, input_size=6\)"):
        model.rnn.layers[0](torch.zeros(3, 5, 7))
    cell = model.rnn.layers[0].cell
    with pytest.raises(ValueError, match=r"each \(3, 8\) torch.float32 on cpu like the input; got \(3, 8\) "
                                         r"torch.float64"):
        manual_layer(cell, torch.zeros(3, 5, 6), cell.initial_state(3, dtype=torch.float64))


def test_the_cells_and_the_stack_refuse_sizes_that_are_not_positive_integers():
    with pytest.raises(ValueError, match="hidden_size must be a positive integer; got 0"):
        LSTMCell(4, 0)
    with pytest.raises(ValueError, match="input_size must be a positive integer; got 2.5"):
        make_cell("rnn", 2.5, 4)
    with pytest.raises(ValueError, match="cell must be one of rnn, gru, lstm; got 'GRU'"):
        make_cell("GRU", 2, 4)
    with pytest.raises(ValueError, match="num_layers must be a positive integer; got 0"):
        RecurrentStack("lstm", 2, 4, num_layers=0)
    with pytest.raises(ValueError, match="forget_bias must be a number or None; got 'auto'"):
        LSTMCell(2, 4, forget_bias="auto")  # LanguageModel's "auto" is resolved before it reaches a cell
    with pytest.raises(TypeError, match="cell must be a Cell"):
        RecurrentLayer("lstm")
    with pytest.raises(ValueError, match="relevance_gate must be True or False; got 'false'"):
        make_cell("gru", 2, 4, relevance_gate="false")  # a string is true: the gate was kept
    with pytest.raises(ValueError, match="bidirectional must be True or False; got 'false'"):
        RecurrentStack("lstm", 2, 4, bidirectional="false")


@pytest.mark.parametrize("options", [
    {}, {"cell": "gru"}, {"cell": "gru", "relevance_gate": False}, {"cell": "rnn", "num_layers": 3},
    {"tie_weights": True, "embed_size": 256}, {"direction": "bi", "num_layers": 1}, {"embed_size": 7, "hidden_size": 5},
])
def test_the_parameter_estimate_is_the_count(options, config_factory):
    from lmtrain.checkpoint import parameter_count
    from lmtrain.model.language_model import parameter_estimate

    config = config_factory(**{f"model.{key}": value for key, value in options.items()})
    assert (sum(parameter_estimate(config.model, 57).values())
            == parameter_count(LanguageModel.from_config(config.model, 57)))


def test_a_model_that_cannot_fit_is_refused_naming_its_keys(config_factory):
    from lmtrain.config import ConfigError
    from lmtrain.model.language_model import check_size

    big = config_factory(**{"model.hidden_size": 10 ** 9})
    with pytest.raises(ConfigError, match=r"would have 1.2e\+19 parameters, most of them in its recurrent "
                                          r"\(model.hidden_size=1000000000, model.num_layers=2\)"):
        check_size(big.model, 100, bytes_per_parameter=16, available=24 * 10 ** 9)
    wide = config_factory(**{"model.embed_size": 10 ** 12, "model.num_layers": 1})
    with pytest.raises(ConfigError, match="model.embed_size=1000000000000"):
        check_size(wide.model, 10, bytes_per_parameter=16, available=24 * 10 ** 9)
    check_size(config_factory().model, 10_000, bytes_per_parameter=16, available=24 * 10 ** 9)  # fits: no error
    check_size(big.model, 100, bytes_per_parameter=16, available=None)                      # unknown: no refusal
