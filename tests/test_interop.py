"""lmtrain.evaluation.interop: torch.nn.RNN/GRU/LSTM imported into lmtrain give torch's outputs, final states and
gradients (float64 to 1e-10, float32 to 1e-5), for every depth, direction and bias; exporting gives
torch modules equal to our stacks; the cells torch lacks are refused with a reason."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lmtrain.evaluation.interop import (
    TorchLayout,
    cell_parameters_from_torch,
    from_torch,
    state_from_torch,
    state_to_torch,
    to_torch,
    torch_suffixes,
)
from lmtrain.model.cells import Cell
from lmtrain.model.layers import RecurrentStack

B, T, E, H = 3, 5, 4, 3
TORCH = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}
TOLERANCE = {torch.float64: dict(rtol=0, atol=1e-10), torch.float32: dict(rtol=0, atol=1e-5)}
CASES = list(itertools.product(TORCH, [1, 2, 3], [False, True], [True, False]))
CASE_IDS = [f"{name}-{layers}l-{'bi' if bi else 'uni'}-{'bias' if bias else 'nobias'}"
            for name, layers, bi, bias in CASES]


def make_torch(name: str, num_layers: int = 2, bidirectional: bool = False, bias: bool = True, *,
               dtype: torch.dtype = torch.float64, **options) -> nn.Module:
    return TORCH[name](E, H, num_layers=num_layers, bias=bias, batch_first=True, bidirectional=bidirectional,
                       dtype=dtype, **options)


def random_torch_state(name: str, module: nn.Module):
    """h0, or (h0, c0) for the LSTM: (num_layers * num_directions, B, H)."""
    shape = (module.num_layers * (2 if module.bidirectional else 1), B, H)
    dtype = module.weight_ih_l0.dtype
    h0 = torch.randn(shape, dtype=dtype)
    return (h0, torch.randn(shape, dtype=dtype)) if name == "lstm" else h0


def as_tuple(state) -> tuple:
    return (state,) if isinstance(state, torch.Tensor) else tuple(state)


def assert_states_close(ours, theirs, **tolerance) -> None:
    ours, theirs = as_tuple(ours), as_tuple(theirs)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, **tolerance)


def linear_loss(output, state, weights) -> torch.Tensor:
    """A fixed random linear function of the outputs and every final state tensor."""
    return sum((tensor * weight).sum() for tensor, weight in zip((output, *as_tuple(state)), weights))


# --- torch -> lmtrain ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name, num_layers, bidirectional, bias", CASES, ids=CASE_IDS)
def test_from_torch_equals_torch(name, num_layers, bidirectional, bias, dtype):
    reference = make_torch(name, num_layers, bidirectional, bias, dtype=dtype)
    ours = from_torch(reference)
    assert isinstance(ours, TorchLayout) and isinstance(ours.stack, RecurrentStack)
    assert all(p.dtype == dtype and p.device == reference.weight_ih_l0.device for p in ours.parameters())
    x = torch.randn(B, T, E, dtype=dtype)
    output, state = ours(x)
    expected_output, expected_state = reference(x)
    assert output.shape == (B, T, 2 * H if bidirectional else H)
    torch.testing.assert_close(output, expected_output, **TOLERANCE[dtype])
    assert_states_close(state, expected_state, **TOLERANCE[dtype])
    # From a given initial state in torch's layout, too.
    initial = random_torch_state(name, reference)
    output, state = ours(x, initial)
    expected_output, expected_state = reference(x, initial)
    torch.testing.assert_close(output, expected_output, **TOLERANCE[dtype])
    assert_states_close(state, expected_state, **TOLERANCE[dtype])


@pytest.mark.parametrize("name, num_layers, bidirectional, bias", CASES, ids=CASE_IDS)
def test_gradients_equal_torch(name, num_layers, bidirectional, bias):
    reference = make_torch(name, num_layers, bidirectional, bias)
    ours = from_torch(reference)
    x = torch.randn(B, T, E, dtype=torch.float64, requires_grad=True)
    initial = random_torch_state(name, reference)
    expected_output, expected_state = reference(x, initial)
    weights = [torch.randn_like(t) for t in (expected_output, *as_tuple(expected_state))]
    torch_parameters = dict(reference.named_parameters())
    expected = torch.autograd.grad(linear_loss(expected_output, expected_state, weights),
                                   [x, *torch_parameters.values()])

    # 1) Our module as it is: d/dx equals torch's, and each of our weights' gradients equals torch's weight
    #    gradients put through the same mapping (a signed permutation of the blocks).
    our_parameters = dict(ours.named_parameters())
    output, state = ours(x, initial)
    grads = torch.autograd.grad(linear_loss(output, state, weights), [x, *our_parameters.values()])
    torch.testing.assert_close(grads[0], expected[0], rtol=0, atol=1e-9)
    our_grads = dict(zip(our_parameters, grads[1:]))
    torch_grads = dict(zip(torch_parameters, expected[1:]))
    cells = [(path, m) for path, m in ours.named_modules() if isinstance(m, Cell)]
    for (path, cell), suffix in zip(cells, torch_suffixes(num_layers, bidirectional), strict=True):
        zero = torch.zeros(cell.hidden_size * len(cell.gates), dtype=torch.float64)
        mapped = cell_parameters_from_torch(name, torch_grads[f"weight_ih_{suffix}"],
                                            torch_grads[f"weight_hh_{suffix}"], zero, zero)
        for gate in cell.gates:
            torch.testing.assert_close(our_grads[f"{path}.W_{gate}"], mapped[f"W_{gate}"], rtol=0, atol=1e-9)

    # 2) All parameters, biases included (torch's bias_ih and bias_hh enter ours as a sum): our module
    #    run on parameters computed from torch's by the mapping gives torch's gradients by the chain rule.
    functional = {}
    for (path, cell), suffix in zip(cells, torch_suffixes(num_layers, bidirectional), strict=True):
        W_ih, W_hh = torch_parameters[f"weight_ih_{suffix}"], torch_parameters[f"weight_hh_{suffix}"]
        zero = torch.zeros(W_ih.size(0), dtype=torch.float64)
        b_ih, b_hh = (torch_parameters[f"bias_ih_{suffix}"], torch_parameters[f"bias_hh_{suffix}"]) if bias else (zero,
                                                                                                                 zero)
        mapped = cell_parameters_from_torch(name, W_ih, W_hh, b_ih, b_hh)
        functional.update({f"{path}.{parameter}": value for parameter, value in mapped.items()})
    assert functional.keys() == our_parameters.keys()
    output, state = functional_call(ours, functional, (x, initial))
    grads = torch.autograd.grad(linear_loss(output, state, weights), [x, *torch_parameters.values()])
    for ours_grad, torch_grad in zip(grads, expected, strict=True):
        torch.testing.assert_close(ours_grad, torch_grad, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", TORCH)
def test_chunked_equals_whole_through_wrapper(name):
    # The truncated-BPTT invariant, with the state carried in torch's layout between chunks.
    reference = make_torch(name, num_layers=2)
    ours = from_torch(reference)
    x = torch.randn(B, T, E, dtype=torch.float64)
    whole, whole_state = ours(x)
    first, state = ours(x[:, :2])
    second, state = ours(x[:, 2:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, rtol=0, atol=1e-12)
    assert_states_close(state, whole_state, rtol=0, atol=1e-12)
    assert_states_close(state, reference(x)[1], **TOLERANCE[torch.float64])


def test_dropout_and_training_mode_carried():
    reference = make_torch("lstm", num_layers=2, dropout=0.25)
    ours = from_torch(reference)
    assert ours.stack.dropout.p == 0.25 and ours.training
    assert to_torch(ours).dropout == 0.25 and to_torch(ours).training
    reference.eval()
    ours = from_torch(reference)
    assert not ours.training and not to_torch(ours).training
    x = torch.randn(B, T, E, dtype=torch.float64)
    torch.testing.assert_close(ours(x)[0], reference(x)[0], **TOLERANCE[torch.float64])


def test_from_torch_refuses_what_lmtrain_lacks():
    with pytest.raises(ValueError, match="relu"):
        from_torch(nn.RNN(E, H, nonlinearity="relu", batch_first=True))
    with pytest.raises(ValueError, match="batch_first=True"):
        from_torch(nn.LSTM(E, H))
    with pytest.raises(ValueError, match="proj_size"):
        from_torch(nn.LSTM(E, H, proj_size=2, batch_first=True))
    with pytest.raises(TypeError, match="Linear"):
        from_torch(nn.Linear(E, H))


# --- lmtrain -> torch ------------------------------------------------------------------------------

@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("name", TORCH)
def test_round_trip_reproduces_torch_parameters(name, num_layers, bidirectional):
    reference = make_torch(name, num_layers, bidirectional)
    back = to_torch(from_torch(reference))
    assert type(back) is type(reference) and back.batch_first and back.bias
    assert (back.num_layers, back.bidirectional, back.input_size, back.hidden_size) == (num_layers, bidirectional, E, H)
    x = torch.randn(B, T, E, dtype=torch.float64)
    torch.testing.assert_close(back(x)[0], reference(x)[0], **TOLERANCE[torch.float64])
    assert_states_close(back(x)[1], reference(x)[1], **TOLERANCE[torch.float64])
    theirs, exported = dict(reference.named_parameters()), dict(back.named_parameters())
    assert theirs.keys() == exported.keys()
    for key in theirs:
        if key.startswith("weight"):
            assert torch.equal(exported[key], theirs[key]), key
        elif key.startswith("bias_ih"):  # only bias_ih + bias_hh is defined by the function torch computes
            hh = key.replace("bias_ih", "bias_hh")
            torch.testing.assert_close(exported[key] + exported[hh], theirs[key] + theirs[hh], rtol=0, atol=1e-15)
    # With torch's bias_hh zero where it enters as a sum (what to_torch writes), every parameter comes back exactly.
    with torch.no_grad():
        for key, value in theirs.items():
            if key.startswith("bias_hh"):
                value[: 2 * H if name == "gru" else None].zero_()  # the GRU's b_hn is kept apart (our b_cc)
    back = to_torch(from_torch(reference))
    for key, value in theirs.items():
        assert torch.equal(dict(back.named_parameters())[key], value), key


STACKS = {
    "rnn": {},
    "gru": {"gru_reset": "after"},
    "lstm": {},
}


@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("name", STACKS)
def test_to_torch_equals_stack(name, bidirectional, wrapped):
    stack = RecurrentStack(name, E, H, num_layers=2, bidirectional=bidirectional, **STACKS[name]).double()
    module = TorchLayout(stack) if wrapped else stack
    exported = to_torch(module)
    assert isinstance(exported, TORCH[name]) and exported.weight_ih_l0.dtype == torch.float64
    x = torch.randn(B, T, E, dtype=torch.float64)
    initial = random_torch_state(name, exported)
    output, state = stack(x, state_from_torch(initial, stack))
    expected_output, expected_state = exported(x, initial)
    torch.testing.assert_close(output, expected_output, **TOLERANCE[torch.float64])
    assert_states_close(state_to_torch(state), expected_state, **TOLERANCE[torch.float64])
    # And back: our stack's parameters come back exactly.
    again = dict(from_torch(exported).stack.named_parameters())
    for key, value in stack.named_parameters():
        assert torch.equal(again[key], value), key


def test_to_torch_refuses_the_lecture_gru():
    with pytest.raises(ValueError, match="reset 'before'.*gru_reset: after"):
        to_torch(RecurrentStack("gru", E, H, gru_reset="before"))
    with pytest.raises(ValueError, match="simplified GRU"):
        to_torch(RecurrentStack("gru", E, H, relevance_gate=False))


# --- states ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("name", TORCH)
def test_state_layout_round_trip(name, bidirectional):
    stack = RecurrentStack(name, E, H, num_layers=3, bidirectional=bidirectional, **STACKS[name]).double()
    initial = random_torch_state(name, to_torch(stack))
    state = state_from_torch(initial, stack)
    assert len(state) == 3
    entry = state[1]
    cell = stack.layers[1].left_to_right_layer.cell if bidirectional else stack.layers[1].cell
    if bidirectional:  # layer 1's rows are 2 (forward) and 3 (backward)
        assert type(entry[0]) is cell.state_type and torch.equal(entry[1][0], as_tuple(initial)[0][3])
    else:
        assert type(entry) is cell.state_type and torch.equal(entry[0], as_tuple(initial)[0][1])
    assert_states_close(state_to_torch(state), initial, rtol=0, atol=0)
    # Plain tuples (as a checkpoint stores them) convert too.
    plain = [tuple(map(tuple, entry)) if bidirectional else tuple(entry) for entry in state]
    assert_states_close(state_to_torch(plain), initial, rtol=0, atol=0)


def test_state_from_torch_checks_the_layout():
    stack = RecurrentStack("lstm", E, H, num_layers=2)
    with pytest.raises(ValueError, match=r"\(h0, c0\)"):
        state_from_torch(torch.zeros(2, B, H), stack)
    with pytest.raises(ValueError, match=r"\(2, B, 3\)"):
        state_from_torch((torch.zeros(1, B, H), torch.zeros(1, B, H)), stack)
    with pytest.raises(ValueError, match="h0"):
        state_from_torch((torch.zeros(2, B, H), torch.zeros(2, B, H)), RecurrentStack("gru", E, H, num_layers=2))


@pytest.mark.parametrize("options", [dict(locked_dropout=True), dict(weight_drop=0.2)])
def test_no_torch_module_for_locked_dropout_or_weight_drop(options):
    stack = RecurrentStack("lstm", 3, 4, num_layers=2, dropout=0.1, **options)
    with pytest.raises(ValueError, match="neither locked"):
        to_torch(stack)
