"""lmtrain.model.layers: the fast layer loop == the cell's reference step; chunked == whole to float64 rounding;
a stacked LSTM == torch.nn.LSTM after weight mapping (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmtrain.model.cells import GRUCell, LSTMCell, RNNCell
from lmtrain.model.layers import RecurrentLayer, RecurrentStack

B, T, E, H = 3, 7, 5, 4
TOL = dict(rtol=1e-12, atol=1e-12)

CELL_CASES = {
    "rnn": lambda e=E: RNNCell(e, H),
    "gru": lambda e=E: GRUCell(e, H, relevance_gate=True),
    "gru-simple": lambda e=E: GRUCell(e, H, relevance_gate=False),
    "lstm": lambda e=E: LSTMCell(e, H),
}


def make_layer(name: str, *, reverse: bool = False) -> RecurrentLayer:
    return RecurrentLayer(CELL_CASES[name](), reverse=reverse).double()


def random_state(cell, batch_size: int = B):
    return cell.state_type(*(torch.randn(batch_size, H, dtype=torch.float64) for _ in cell.state_type._fields))


def loop_reference(cell, x, state, *, reverse: bool = False):
    """Call the cell's line-by-line `forward` at every step."""
    outputs = [None] * x.size(1)
    steps = range(x.size(1) - 1, -1, -1) if reverse else range(x.size(1))
    for t in steps:
        outputs[t], state = cell(x[:, t], state)
    return torch.stack(outputs, dim=1), state


def assert_states_equal(ours, reference, **tolerance):
    assert len(ours) == len(reference)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, **tolerance)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name", CELL_CASES)
def test_layer_equals_cell_loop(name: str, reverse: bool):
    layer = make_layer(name, reverse=reverse)
    x = torch.randn(B, T, E, dtype=torch.float64)
    state = random_state(layer.cell)
    outputs, final = layer(x, state)
    expected_outputs, expected_final = loop_reference(layer.cell, x, state, reverse=reverse)
    assert outputs.shape == (B, T, H)
    torch.testing.assert_close(outputs, expected_outputs, **TOL)
    assert_states_equal(final, expected_final, **TOL)
    assert type(final) is layer.cell.state_type


@pytest.mark.parametrize("name", CELL_CASES)
def test_reverse_equals_flipped_forward(name: str):
    forward = make_layer(name)
    backward = RecurrentLayer(forward.cell, reverse=True)
    x = torch.randn(B, T, E, dtype=torch.float64)
    state = random_state(forward.cell)
    flipped_outputs, flipped_final = forward(x.flip(1), state)
    outputs, final = backward(x, state)
    torch.testing.assert_close(outputs, flipped_outputs.flip(1), **TOL)
    assert_states_equal(final, flipped_final, **TOL)
    # The last output of a reversed layer is its first step: it has seen only x(T).
    single, _ = forward(x[:, -1:], state)
    torch.testing.assert_close(outputs[:, -1], single[:, 0], **TOL)


CHUNKINGS = [[7], [3, 4], [1, 1, 1, 1, 1, 1, 1], [2, 5], [6, 1]]


def run_chunked(layer, x, chunks):
    state, pieces = None, []
    for piece in x.split(chunks, dim=1):
        out, state = layer(piece, state)
        pieces.append(out)
    return torch.cat(pieces, dim=1), state


@pytest.mark.parametrize("chunks", CHUNKINGS)
@pytest.mark.parametrize("name", CELL_CASES)
def test_chunked_equals_whole_to_rounding(name: str, chunks: list[int]):
    # The truncated-BPTT invariant (torch-rnn): running in chunks with the state carried equals running
    # the whole sequence. Not bit for bit: the layer's input projection is one GEMM over all B*T rows,
    # and MKL's rounding depends on the row count (seen: 1e-16 differences in float64), so float64
    # rounding is the tolerance; a wrongly carried state gives errors of order 1.
    layer = make_layer(name)
    x = torch.randn(B, T, E, dtype=torch.float64)
    whole, whole_final = layer(x)
    chunked, state = run_chunked(layer, x, chunks)
    torch.testing.assert_close(chunked, whole, **TOL)
    assert_states_equal(state, whole_final, **TOL)
    restarted, _ = run_chunked(layer, x[:, 1:], [T - 1])  # not carrying the state does differ
    assert (restarted - whole[:, 1:]).abs().max() > 1e-6


@pytest.mark.parametrize("name", CELL_CASES)
def test_stack_chunked_equals_whole(name: str):
    stack = RecurrentStack(name.split("-")[0], E, H, num_layers=3, relevance_gate=name != "gru-simple").double()
    x = torch.randn(B, T, E, dtype=torch.float64)
    whole, whole_final = stack(x)
    first, state = stack(x[:, :3])
    second, state = stack(x[:, 3:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, **TOL)
    for ours, reference in zip(state, whole_final):
        assert_states_equal(ours, reference, **TOL)


@pytest.mark.parametrize("name", CELL_CASES)
def test_missing_state_is_zeros(name: str):
    layer = make_layer(name)
    x = torch.randn(B, T, E, dtype=torch.float64)
    zeros = layer.cell.state_type(*(torch.zeros(B, H, dtype=torch.float64) for _ in layer.cell.state_type._fields))
    implicit, implicit_final = layer(x)
    explicit, explicit_final = layer(x, zeros)
    assert torch.equal(implicit, explicit)
    assert_states_equal(implicit_final, explicit_final, rtol=0, atol=0)
    assert implicit.dtype == torch.float64


def test_stack_missing_state_is_zeros():
    stack = RecurrentStack("lstm", E, H, num_layers=2).double()
    x = torch.randn(B, T, E, dtype=torch.float64)
    zeros = stack.initial_state(B, dtype=torch.float64)
    assert len(zeros) == 2 and all(torch.equal(t, torch.zeros(B, H, dtype=torch.float64)) for s in zeros for t in s)
    implicit, _ = stack(x)
    explicit, _ = stack(x, zeros)
    assert torch.equal(implicit, explicit)


@pytest.mark.parametrize("name", CELL_CASES)
def test_empty_sequence(name: str):
    layer = make_layer(name)
    x = torch.randn(B, 0, E, dtype=torch.float64)
    outputs, final = layer(x)
    assert outputs.shape == (B, 0, H) and outputs.dtype == torch.float64
    assert all(torch.equal(t, torch.zeros(B, H, dtype=torch.float64)) for t in final)
    state = random_state(layer.cell)
    _, kept = layer(x, state)
    assert_states_equal(kept, state, rtol=0, atol=0)


def test_empty_sequence_through_stack():
    stack = RecurrentStack("gru", E, H, num_layers=2).double()
    outputs, state = stack(torch.randn(B, 0, E, dtype=torch.float64))
    assert outputs.shape == (B, 0, H) and len(state) == 2


def map_lstm_weights(stack: RecurrentStack, reference: nn.LSTM) -> None:
    """Our gates (f, u, c, o) over [a, x] -> torch's (i, f, g, o) with separate W_ih, W_hh; b_hh = 0."""
    order = ("u", "f", "c", "o")
    with torch.no_grad():
        for index, layer in enumerate(stack.layers):
            cell = layer.cell
            getattr(reference, f"weight_ih_l{index}").copy_(torch.cat([getattr(cell, f"W_{g}")[:, H:] for g in order]))
            getattr(reference, f"weight_hh_l{index}").copy_(torch.cat([getattr(cell, f"W_{g}")[:, :H] for g in order]))
            getattr(reference, f"bias_ih_l{index}").copy_(torch.cat([getattr(cell, f"b_{g}") for g in order]))
            getattr(reference, f"bias_hh_l{index}").zero_()


def test_two_layer_lstm_stack_equals_torch_lstm():
    stack = RecurrentStack("lstm", E, H, num_layers=2, dropout=0.0).double()
    reference = nn.LSTM(E, H, num_layers=2, batch_first=True).double()
    map_lstm_weights(stack, reference)
    x = torch.randn(B, T, E, dtype=torch.float64)
    a0 = torch.randn(2, B, H, dtype=torch.float64)
    c0 = torch.randn(2, B, H, dtype=torch.float64)
    outputs, state = stack(x, [(a0[0], c0[0]), (a0[1], c0[1])])
    expected, (h_n, c_n) = reference(x, (a0, c0))
    torch.testing.assert_close(outputs, expected, **TOL)
    torch.testing.assert_close(torch.stack([s.a for s in state]), h_n, **TOL)
    torch.testing.assert_close(torch.stack([s.c for s in state]), c_n, **TOL)
    # From zeros, too.
    outputs, state = stack(x)
    expected, (h_n, c_n) = reference(x)
    torch.testing.assert_close(outputs, expected, **TOL)
    torch.testing.assert_close(torch.stack([s.c for s in state]), c_n, **TOL)


def test_single_layer_rnn_equals_torch_rnn():
    stack = RecurrentStack("rnn", E, H, num_layers=1).double()
    reference = nn.RNN(E, H, batch_first=True).double()
    cell = stack.layers[0].cell
    with torch.no_grad():
        reference.weight_ih_l0.copy_(cell.W_a[:, H:])
        reference.weight_hh_l0.copy_(cell.W_a[:, :H])
        reference.bias_ih_l0.copy_(cell.b_a)
        reference.bias_hh_l0.zero_()
    x = torch.randn(B, T, E, dtype=torch.float64)
    outputs, (state,) = stack(x)
    expected, h_n = reference(x)
    torch.testing.assert_close(outputs, expected, **TOL)
    torch.testing.assert_close(state.a, h_n[0], **TOL)


def test_stack_layer_sizes_and_dropout():
    stack = RecurrentStack("gru", E, H, num_layers=3, dropout=0.5, relevance_gate=False)
    assert [layer.cell.input_size for layer in stack.layers] == [E, H, H]
    assert all(layer.cell.relevance_gate is False for layer in stack.layers)
    x = torch.randn(B, T, E)
    stack.eval()
    assert torch.equal(stack(x)[0], stack(x)[0])  # no dropout in eval mode
    stack.train()
    assert not torch.equal(stack(x)[0], stack(x)[0])  # dropout between layers in training


def test_stack_dropout_not_on_the_input():
    # Dropout sits between layers only: a one-layer stack is deterministic even in training mode.
    stack = RecurrentStack("lstm", E, H, num_layers=1, dropout=0.5).train()
    x = torch.randn(B, T, E)
    assert torch.equal(stack(x)[0], stack(x)[0])


def test_gradients_flow_to_all_parameters():
    stack = RecurrentStack("lstm", E, H, num_layers=2).double()
    outputs, _ = stack(torch.randn(B, T, E, dtype=torch.float64))
    outputs.sum().backward()
    for name, parameter in stack.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
