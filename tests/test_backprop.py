"""lmtrain/backprop: the hand-written backpropagation through time. Numeric gradients agree
(gradcheck), and values and gradients equal autograd's: a layer either way, reversed, T = 1, a
two-layer stack, chunked truncated BPTT; float32 close to float64. Small sizes, float64."""

from __future__ import annotations

import copy

import pytest
import torch

from lmtrain.backprop.stacking import stack_gates
from lmtrain.model.cells import GRUCell, LSTMCell, RNNCell
from lmtrain.model.layers import RecurrentLayer, RecurrentStack, function_for, manual_layer
from lmtrain.speed.route import choose

B, T, E, H = 2, 4, 3, 3
VALUES = dict(rtol=1e-12, atol=1e-12)
GRADIENTS = dict(rtol=1e-10, atol=1e-10)

# name -> (the cell, RecurrentStack's arguments for the same cell)
CELL_CASES = {
    "rnn": (lambda: RNNCell(E, H), dict(cell="rnn")),
    "gru": (lambda: GRUCell(E, H), dict(cell="gru")),
    "gru-simple": (lambda: GRUCell(E, H, relevance_gate=False), dict(cell="gru", relevance_gate=False)),
    "gru-after": (lambda: GRUCell(E, H, gru_reset="after"), dict(cell="gru", gru_reset="after")),
    "lstm": (lambda: LSTMCell(E, H), dict(cell="lstm")),
}


def make_cell(name: str, dtype: torch.dtype = torch.float64):
    return CELL_CASES[name][0]().to(dtype)


def random_inputs(cell, steps: int = T, dtype: torch.dtype = torch.float64):
    """x (B, steps, E) and a random initial state, both leaves that require grad."""
    x = torch.randn(B, steps, E, dtype=dtype, requires_grad=True)
    state = cell.state_type(*(torch.randn(B, H, dtype=dtype, requires_grad=True) for _ in cell.state_type._fields))
    return x, state


def loss_of(outputs, final_state) -> torch.Tensor:
    """Uses the outputs and every final-state tensor, each with its own fixed weights (drawn in
    float64 on the CPU whatever the dtype and device, so that every run's loss is the same function)."""
    generator = torch.Generator().manual_seed(1)
    weights = lambda t: torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.device, t.dtype)  # noqa: E731
    loss = (outputs * weights(outputs)).sum()
    for tensor in final_state:
        loss = loss + (tensor * weights(tensor)).sum() ** 2
    return loss


def gradients(layer, x, state, loss_fn=loss_of):
    """Values and gradients (x, initial state, every named parameter) of one forward + backward."""
    x = x.detach().requires_grad_()
    state = tuple(s.detach().requires_grad_() for s in state)
    layer.zero_grad()
    outputs, final = layer(x, state)
    loss_fn(outputs, final).backward()
    named = {name: p.grad.clone() for name, p in layer.named_parameters()}
    return outputs, final, {"x": x.grad, **{f"state{i}": s.grad for i, s in enumerate(state)}, **named}


def both_layers(name: str, *, reverse: bool = False, dtype: torch.dtype = torch.float64):
    cell = make_cell(name, dtype)
    return (RecurrentLayer(cell, reverse=reverse, gradients="autograd"),
            RecurrentLayer(copy.deepcopy(cell), reverse=reverse, gradients="manual"))


def assert_gradients_equal(ours: dict, reference: dict, **tolerance) -> None:
    assert ours.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], **tolerance, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("name", CELL_CASES)
def test_gradcheck(name: str):
    """Numeric == analytic Jacobians for x, the initial state and every parameter (b_cc included)."""
    cell = make_cell(name)
    function, extra = function_for(cell)
    x, state = random_inputs(cell)
    weights = tuple(w.detach().clone().requires_grad_() for w in cell.stacked_weights())
    extra = tuple(e.detach().clone().requires_grad_() if isinstance(e, torch.Tensor) else e for e in extra)
    assert torch.autograd.gradcheck(function.apply, (choose(x), x, *state, *weights, *extra))


@pytest.mark.parametrize("steps", [T, 1])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name", CELL_CASES)
def test_equals_autograd(name: str, reverse: bool, steps: int):
    autograd_layer, manual = both_layers(name, reverse=reverse)
    x, state = random_inputs(autograd_layer.cell, steps)
    expected_outputs, expected_final, expected = gradients(autograd_layer, x, state)
    outputs, final, ours = gradients(manual, x, state)
    torch.testing.assert_close(outputs, expected_outputs, **VALUES)
    assert type(final) is manual.cell.state_type
    for a, b in zip(final, expected_final, strict=True):
        torch.testing.assert_close(a, b, **VALUES)
    assert_gradients_equal(ours, expected, **GRADIENTS)


@pytest.mark.parametrize("name", CELL_CASES)
def test_loss_on_final_state_only(name: str):
    """No gradient reaches the outputs: the final state's gradient alone seeds the loop."""
    autograd_layer, manual = both_layers(name)
    x, state = random_inputs(autograd_layer.cell)
    only_final = lambda outputs, final: loss_of(outputs[:, :0], final)  # noqa: E731
    expected = gradients(autograd_layer, x, state, only_final)[2]
    assert_gradients_equal(gradients(manual, x, state, only_final)[2], expected, **GRADIENTS)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("name", CELL_CASES)
def test_two_layer_stack_equals_autograd(name: str, bidirectional: bool):
    """With dropout between the layers: the same seed drops the same units in both modes."""
    options = dict(CELL_CASES[name][1], input_size=E, hidden_size=H, num_layers=2, bidirectional=bidirectional,
                   dropout=0.5)
    reference = RecurrentStack(**options, gradients="autograd").double()
    stack = RecurrentStack(**options, gradients="manual").double()
    stack.load_state_dict(reference.state_dict())
    x = torch.randn(B, T, E, dtype=torch.float64)
    for model in (reference, stack):
        torch.manual_seed(1)
        outputs, state = model(x)
        flat = [t for layer in state for t in (layer[0] + layer[1] if bidirectional else layer)]
        loss_of(outputs, flat).backward()
    for (key, p), q in zip(reference.named_parameters(), stack.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, **GRADIENTS, msg=lambda m: f"{key}: {m}")


def chunked_gradients(layer, x, *, detach: bool) -> dict:
    """Two chunks, the state carried; `detach=True` is truncated BPTT (one backward per chunk)."""
    layer.zero_grad()
    state, total = None, 0.0
    for chunk in x.split(x.size(1) // 2, dim=1):
        outputs, state = layer(chunk, state)
        loss = loss_of(outputs, state)
        if detach:
            loss.backward()
            state = tuple(s.detach() for s in state)
        else:
            total = total + loss
    if not detach:
        total.backward()
    return {name: p.grad.clone() for name, p in layer.named_parameters()}


@pytest.mark.parametrize("name", CELL_CASES)
def test_chunked_equals_autograd(name: str):
    autograd_layer, manual = both_layers(name)
    x = torch.randn(B, 2 * T, E, dtype=torch.float64)
    for detach in (True, False):  # False: chunk 2's gradient flows back into chunk 1's final state
        expected = chunked_gradients(autograd_layer, x, detach=detach)
        assert_gradients_equal(chunked_gradients(manual, x, detach=detach), expected, **GRADIENTS)


@pytest.mark.parametrize("name", CELL_CASES)
def test_float32_close_to_float64(name: str):
    reference, _ = both_layers(name)
    manual = RecurrentLayer(copy.deepcopy(reference.cell).float(), gradients="manual")
    x, state = random_inputs(reference.cell)
    expected = gradients(reference, x, state)[2]
    outputs, final, ours = gradients(manual, x.float(), tuple(s.float() for s in state))
    assert outputs.dtype == torch.float32 and all(g.dtype == torch.float32 for g in ours.values())
    assert_gradients_equal({k: g.double() for k, g in ours.items()}, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", CELL_CASES)
def test_no_grad_and_frozen_inputs(name: str):
    """Runs under no_grad; with an input and state that need no gradient only the weights get one."""
    cell = make_cell(name)
    x = torch.randn(B, T, E, dtype=torch.float64)
    state = cell.initial_state(B, dtype=torch.float64)
    with torch.no_grad():
        outputs, final = manual_layer(cell, x, state)
    assert outputs.shape == (B, T, H) and not outputs.requires_grad
    outputs, final = manual_layer(cell, x, state)
    loss_of(outputs, final).backward()
    assert all(p.grad is not None for p in cell.parameters())


@pytest.mark.parametrize("name", CELL_CASES)
def test_empty_sequence_passes_the_state_through(name: str):
    """T = 0 (the layer answers it itself; the Function copes too): final state = initial state."""
    cell = make_cell(name)
    x, state = random_inputs(cell, steps=0)
    outputs, final = manual_layer(cell, x, state)
    assert outputs.shape == (B, 0, H)
    loss_of(outputs, final).backward()
    for initial, last in zip(state, final, strict=True):
        torch.testing.assert_close(last, initial, rtol=0, atol=0)
        assert initial.grad is not None and x.grad.shape == x.shape


def test_stacked_gates_give_each_gate_the_gradient_autograds_slicing_gives():
    """`stack_gates` makes each gate's gradient in one piece; the values are autograd's, to the bit,
    whichever of the stacked tensors the loss reads (the others' gradients are zeros)."""
    torch.manual_seed(0)
    H, E, G = 5, 3, 4
    W = [torch.randn(H, H + E, requires_grad=True) for _ in range(G)]
    b = [torch.randn(H, requires_grad=True) for _ in range(G)]
    stacked = stack_gates(W, b, H)
    by_slicing = (torch.cat([W_gate[:, :H] for W_gate in W]), torch.cat([W_gate[:, H:] for W_gate in W]),
                  torch.cat(b))
    for mine, theirs in zip(stacked, by_slicing, strict=True):
        assert torch.equal(mine, theirs) and mine.is_contiguous()
    upstream = [torch.randn_like(tensor) for tensor in stacked]
    for used in ([0, 1, 2], [0], [1]):
        mine = torch.autograd.grad([stacked[i] for i in used], W + b, [upstream[i] for i in used],
                                   retain_graph=True, allow_unused=True)
        theirs = torch.autograd.grad([by_slicing[i] for i in used], W + b, [upstream[i] for i in used],
                                     retain_graph=True, allow_unused=True)
        for m, t in zip(mine, theirs, strict=True):
            assert torch.equal(m, t if t is not None else torch.zeros_like(m))
