"""lmtrain.model.cells: line-by-line `forward` == stacked `step`, == torch.nn references, gradcheck (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lmtrain.model.cells import CELLS, GRUCell, GRUState, LSTMCell, LSTMState, RNNCell, RNNState, combine, make_cell

B, E, H = 3, 5, 4
TOL = dict(rtol=1e-12, atol=1e-12)

CELL_CASES = {
    "rnn": lambda: RNNCell(E, H),
    "gru": lambda: GRUCell(E, H, relevance_gate=True),
    "gru-simple": lambda: GRUCell(E, H, relevance_gate=False),
    "lstm": lambda: LSTMCell(E, H),
}


def make(name: str) -> nn.Module:
    return CELL_CASES[name]().double()


def random_state(cell, batch_size: int = B) -> tuple[torch.Tensor, ...]:
    return cell.state_type(*(torch.randn(batch_size, H, dtype=torch.float64) for _ in cell.state_type._fields))


# --- structure -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, gates", [("rnn", "a"), ("gru", "urc"), ("gru-simple", "uc"), ("lstm", "fuco")])
def test_parameters_named_after_the_lecture(name: str, gates: str):
    cell = make(name)
    expected = {f"{kind}_{gate}" for gate in gates for kind in "Wb"}
    assert {n for n, _ in cell.named_parameters()} == expected
    for gate in gates:
        assert getattr(cell, f"W_{gate}").shape == (H, H + E)
        assert getattr(cell, f"b_{gate}").shape == (H,)


@pytest.mark.parametrize("name", CELL_CASES)
def test_initialisation_bound(name: str):
    cell = CELL_CASES[name]()
    bound = 1 / H ** 0.5
    for parameter_name, parameter in cell.named_parameters():
        if parameter_name == "b_f":
            continue
        assert parameter.abs().max() <= bound
        assert parameter.std() > 0.1 * bound  # actually random, not constant


def test_lstm_forget_bias_is_a_constant_when_given():
    cell = LSTMCell(E, H, forget_bias=1.0)
    assert torch.equal(cell.b_f, torch.ones(H))
    cell.reset_parameters()
    assert torch.equal(cell.b_f, torch.ones(H))
    drawn = LSTMCell(E, H)  # the default, as nn.LSTM: b_f drawn like every other bias
    assert not torch.equal(drawn.b_f, torch.ones(H)) and float(drawn.b_f.detach().abs().max()) <= 1 / H ** 0.5


@pytest.mark.parametrize("name", CELL_CASES)
def test_initial_state_is_zeros(name: str):
    cell = make(name)
    state = cell.initial_state(2, dtype=torch.float64)
    assert isinstance(state, cell.state_type)
    assert len(state) == (2 if name == "lstm" else 1)
    for tensor in state:
        assert tensor.dtype == torch.float64 and torch.equal(tensor, torch.zeros(2, H, dtype=torch.float64))


def test_make_cell():
    assert type(make_cell("rnn", E, H)) is RNNCell
    assert type(make_cell("lstm", E, H)) is LSTMCell
    assert make_cell("gru", E, H).relevance_gate is True
    assert make_cell("gru", E, H, relevance_gate=False).relevance_gate is False
    assert set(CELLS) == {"rnn", "gru", "lstm"}


def test_stacked_weights_split():
    cell = make("lstm")
    W_recurrent, W_input, b = cell.stacked_weights()
    assert W_recurrent.shape == (4 * H, H) and W_input.shape == (4 * H, E) and b.shape == (4 * H,)
    assert torch.equal(W_recurrent[H:2 * H], cell.W_u[:, :H])
    assert torch.equal(W_input[3 * H:], cell.W_o[:, H:])
    assert torch.equal(b[:H], cell.b_f)


def test_stacked_weights_kept_without_autograd_until_a_weight_changes():
    cell = make("lstm")
    with torch.no_grad():
        first = cell.stacked_weights()
        assert cell.stacked_weights() is first  # no copy per sampled token
        cell.W_c.add_(1.0)  # an optimizer step or load_state_dict changes weights in place
        changed = cell.stacked_weights()
        assert changed is not first and torch.equal(changed[0][2 * H:3 * H], cell.W_c[:, :H])
        cell.load_state_dict({name: torch.zeros_like(p) for name, p in cell.state_dict().items()})
        assert not cell.stacked_weights()[1].any()
    with_grad = cell.stacked_weights()  # with autograd: a fresh stack that gradients flow through
    assert with_grad[0].requires_grad and with_grad[0] is not cell.stacked_weights()[0]
    assert all(part.is_contiguous() for part in with_grad)


def test_combine_order():
    a, x = torch.ones(2, 3), torch.zeros(2, 4)
    assert combine(a, x).tolist() == [[1, 1, 1, 0, 0, 0, 0]] * 2


# --- forward == step -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CELL_CASES)
def test_forward_equals_step(name: str):
    cell = make(name)
    x = torch.randn(B, E, dtype=torch.float64)
    state = random_state(cell)
    output, new_state = cell(x, state)
    W_recurrent, W_input, b = cell.stacked_weights()
    stepped = cell.step(x @ W_input.T + b, state, W_recurrent)
    assert type(stepped) is type(new_state) is cell.state_type
    assert torch.equal(output, new_state[0])
    for ours, reference in zip(stepped, new_state):
        torch.testing.assert_close(ours, reference, **TOL)


@pytest.mark.parametrize("name", CELL_CASES)
def test_plain_tuple_state_works(name: str):
    cell = make(name)
    x = torch.randn(B, E, dtype=torch.float64)
    state = random_state(cell)
    _, named = cell(x, state)
    _, plain = cell(x, tuple(state))
    for a, b in zip(named, plain):
        assert torch.equal(a, b)


# --- torch.nn references ---------------------------------------------------------------------------

def test_rnn_equals_torch_rnn_cell():
    cell = make("rnn")
    reference = nn.RNNCell(E, H, nonlinearity="tanh").double()
    with torch.no_grad():
        reference.weight_ih.copy_(cell.W_a[:, H:])
        reference.weight_hh.copy_(cell.W_a[:, :H])
        reference.bias_ih.copy_(cell.b_a)
        reference.bias_hh.zero_()
    x = torch.randn(B, E, dtype=torch.float64)
    a_prev = torch.randn(B, H, dtype=torch.float64)
    output, (a,) = cell(x, RNNState(a_prev))
    torch.testing.assert_close(output, reference(x, a_prev), **TOL)
    torch.testing.assert_close(a, output, rtol=0, atol=0)


def test_lstm_equals_torch_lstm_cell():
    cell = make("lstm")
    reference = nn.LSTMCell(E, H).double()
    order = ("u", "f", "c", "o")  # torch: input (= update), forget, cell candidate (g), output
    with torch.no_grad():
        reference.weight_ih.copy_(torch.cat([getattr(cell, f"W_{g}")[:, H:] for g in order]))
        reference.weight_hh.copy_(torch.cat([getattr(cell, f"W_{g}")[:, :H] for g in order]))
        reference.bias_ih.copy_(torch.cat([getattr(cell, f"b_{g}") for g in order]))
        reference.bias_hh.zero_()
    x = torch.randn(B, E, dtype=torch.float64)
    a_prev, c_prev = torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    output, (a, c) = cell(x, LSTMState(a_prev, c_prev))
    h_ref, c_ref = reference(x, (a_prev, c_prev))
    torch.testing.assert_close(a, h_ref, **TOL)
    torch.testing.assert_close(c, c_ref, **TOL)
    assert torch.equal(output, a)


def reference_gru(x, c_prev, W, b, relevance_gate: bool):
    """The lecture's GRU, written independently gate by gate with explicit matrix halves."""
    W_u, W_r, W_c = W
    b_u, b_r, b_c = b
    u = 1 / (1 + torch.exp(-(c_prev @ W_u[:, :H].T + x @ W_u[:, H:].T + b_u)))
    r = 1 / (1 + torch.exp(-(c_prev @ W_r[:, :H].T + x @ W_r[:, H:].T + b_r))) if relevance_gate else 1.0
    candidate = torch.tanh((r * c_prev) @ W_c[:, :H].T + x @ W_c[:, H:].T + b_c)
    return u * candidate + (1 - u) * c_prev


@pytest.mark.parametrize("relevance_gate", [True, False])
def test_gru_equals_independent_reference(relevance_gate: bool):
    cell = make("gru" if relevance_gate else "gru-simple")
    x = torch.randn(B, E, dtype=torch.float64)
    c_prev = torch.randn(B, H, dtype=torch.float64)
    W_r = cell.W_r if relevance_gate else None
    b_r = cell.b_r if relevance_gate else None
    expected = reference_gru(x, c_prev, (cell.W_u, W_r, cell.W_c), (cell.b_u, b_r, cell.b_c), relevance_gate)
    output, (c,) = cell(x, GRUState(c_prev))
    torch.testing.assert_close(c, expected, **TOL)
    assert torch.equal(output, c)


def test_gru_relevance_gate_applies_before_the_product():
    # With a closed relevance gate (Γ_r = 0) the candidate cannot see c(t-1) at all.
    cell = make("gru")
    with torch.no_grad():
        cell.W_r.zero_()
        cell.b_r.fill_(-1e3)
    x = torch.randn(B, E, dtype=torch.float64)
    c1, c2 = torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    with torch.no_grad():
        cell.W_u.zero_()
        cell.b_u.fill_(1e3)  # Γ_u = 1: c(t) = c̃(t)
    (_, (first,)), (_, (second,)) = cell(x, GRUState(c1)), cell(x, GRUState(c2))
    torch.testing.assert_close(first, second, rtol=0, atol=1e-15)
    expected = torch.tanh(x @ cell.W_c[:, H:].T + cell.b_c)
    torch.testing.assert_close(first, expected, **TOL)


def test_gru_update_gate_zero_keeps_memory():
    cell = make("gru")
    with torch.no_grad():
        cell.W_u.zero_()
        cell.b_u.fill_(-1e3)  # Γ_u = 0
    c_prev = torch.randn(B, H, dtype=torch.float64)
    _, (c,) = cell(torch.randn(B, E, dtype=torch.float64), GRUState(c_prev))
    torch.testing.assert_close(c, c_prev, rtol=0, atol=1e-15)


# --- gradients -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CELL_CASES)
def test_gradcheck_forward(name: str):
    batch, inputs, hidden = 2, 3, H
    cell = {"rnn": lambda: RNNCell(inputs, hidden), "gru": lambda: GRUCell(inputs, hidden),
            "gru-simple": lambda: GRUCell(inputs, hidden, relevance_gate=False),
            "lstm": lambda: LSTMCell(inputs, hidden)}[name]().double()
    names = [n for n, _ in cell.named_parameters()]
    n_state = len(cell.state_type._fields)

    def function(x, *rest):
        state, parameters = rest[:n_state], rest[n_state:]
        output, new_state = functional_call(cell, dict(zip(names, parameters)), (x, cell.state_type(*state)))
        return (output, *new_state)

    x = torch.randn(batch, inputs, dtype=torch.float64, requires_grad=True)
    state = [torch.randn(batch, hidden, dtype=torch.float64, requires_grad=True) for _ in range(n_state)]
    parameters = [p.detach().clone().requires_grad_() for p in cell.parameters()]
    assert torch.autograd.gradcheck(function, (x, *state, *parameters), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("name", CELL_CASES)
def test_step_gradients_equal_forward_gradients(name: str):
    cell = make(name)
    x = torch.randn(B, E, dtype=torch.float64)
    state = random_state(cell)
    output, _ = cell(x, state)
    forward_grads = torch.autograd.grad(output.sum(), list(cell.parameters()))
    W_recurrent, W_input, b = cell.stacked_weights()
    stepped = cell.step(x @ W_input.T + b, state, W_recurrent)
    step_grads = torch.autograd.grad(stepped[0].sum(), list(cell.parameters()))
    for ours, reference in zip(step_grads, forward_grads):
        torch.testing.assert_close(ours, reference, **TOL)
