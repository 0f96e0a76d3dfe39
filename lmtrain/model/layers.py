"""Running cells over time: a layer runs one cell along a sequence (left to right, or right to left),
a bidirectional layer runs one of each, and a stack of either is the lecture's deep RNN.

Batch-first throughout: inputs are (B, T, E), outputs (B, T, H), or (B, T, 2H) when bidirectional.
A layer's state is its cell's state; a bidirectional layer's state is the pair (left to right, right to left);
a stack's state is a list with one entry per layer. A missing state means `a(0) = 0`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd import Function

from lmtrain.backprop.gru import GRUAfterFunction, GRUFunction
from lmtrain.backprop.lstm import LSTMFunction
from lmtrain.backprop.rnn import RNNFunction
from lmtrain.config import ModelConfig, choices
from lmtrain.model import arguments
from lmtrain.model.cells import Cell, GRUCell, LSTMCell, RNNCell, make_cell
from lmtrain.model.regularization import SequenceDropout, drop_connect
from lmtrain.speed.route import Route, choose

DEFAULTS = ModelConfig()  # the constructors' defaults are the config's: the route `lmtrain train` takes


def function_for(cell: Cell) -> tuple[type[Function], tuple]:
    """The Function that runs `cell` over a sequence, and its arguments after (x, *state, W_recurrent,
    W_input, b)."""
    if isinstance(cell, LSTMCell):
        return LSTMFunction, ()
    if isinstance(cell, GRUCell):
        return (GRUAfterFunction, (cell.b_cc,)) if cell.gru_reset == "after" else (GRUFunction, (cell.relevance_gate,))
    if isinstance(cell, RNNCell):
        return RNNFunction, ()
    raise TypeError(f"no hand-written backpropagation for {type(cell).__name__}")


def manual_layer(cell: Cell, x: Tensor, state: tuple[Tensor, ...], *, reverse: bool = False,
                 weights: tuple[Tensor, Tensor, Tensor] | None = None, route: Route | None = None
                 ) -> tuple[Tensor, tuple[Tensor, ...]]:
    """`cell` over x (B, T, E) from `state`: outputs a(1..T) (B, T, H) and the final state, the same
    values as the autograd layer, with the hand-written backpropagation. `reverse` runs right to left.
    `weights`: (W_recurrent, W_input, b) to use instead of `cell.stacked_weights()` (e.g. after DropConnect;
    their gradients flow back through autograd to the cell's parameters). `route`: how it runs, chosen
    for x when not given (`lmtrain.speed.route.choose`)."""
    check_input(cell, x)
    check_state(cell, state, x, same_type=True)  # the compiled loops trust its shape
    return _manual_layer(cell, x, state, reverse=reverse, weights=weights, route=route)


def _manual_layer(cell: Cell, x: Tensor, state: tuple[Tensor, ...], *, reverse: bool,
                  weights: tuple[Tensor, Tensor, Tensor] | None, route: Route | None
                  ) -> tuple[Tensor, tuple[Tensor, ...]]:
    """`manual_layer` on arguments checked already."""
    function, extra = function_for(cell)
    W_recurrent, W_input, b = weights if weights is not None else cell.stacked_weights()
    if reverse:
        x = x.flip(1)
    route = route if route is not None else choose(x)
    outputs, *final = function.apply(route, x, *state, W_recurrent, W_input, b, *extra)
    if reverse:
        outputs = outputs.flip(1)
    return outputs, cell.state_type(*final)


def check_input(cell: Cell, x: Tensor) -> None:
    """Refuse, naming it, an input a layer of `cell` cannot read: (B, T, input_size) floating point."""
    if not isinstance(x, Tensor) or x.dim() != 3 or x.size(2) != cell.input_size or not x.is_floating_point():
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating-point tensor (batch, time, input_size={cell.input_size}); got {got}")


def check_state(cell: Cell, state: tuple, x: Tensor, *, same_type: bool) -> None:
    """Refuse, naming it, a state that is not the cell's for this input: the compiled loops read it as
    (B, H), a state of another batch size past its end, and `same_type` in x's dtype and device (autograd's
    products mix them under torch.autocast)."""
    fields = cell.state_type._fields
    B, H = x.size(0), cell.hidden_size
    if (not isinstance(state, tuple) or len(state) != len(fields)
            or any(not isinstance(part, Tensor) or part.shape != (B, H)
                   or same_type and (part.dtype != x.dtype or part.device != x.device) for part in state)):
        got = (", ".join(f"{tuple(part.shape)} {part.dtype} on {part.device}" if isinstance(part, Tensor)
                         else type(part).__name__ for part in state) if isinstance(state, (tuple, list))
               else type(state).__name__)
        raise ValueError(f"state must be the {type(cell).__name__}'s ({', '.join(fields)}), each ({B}, {H}) "
                         f"{x.dtype} on {x.device} like the input; got {got}")


class RecurrentLayer(nn.Module):
    """One cell applied at every time step, left to right (or right to left with `reverse=True`).

    The input half of every gate, `W_x x(t) + b`, is one matrix product over all T steps before the
    loop; the loop then adds only the recurrent half (`Cell.step`). Same maths as calling the
    cell's line-by-line `forward` at each step, a test proves it. `gradients="manual"` runs the
    hand-written backpropagation through time of `lmtrain/backprop/` instead of autograd's.
    `weight_drop` > 0: in training, DropConnect on the recurrent weights, one mask per call
    (`regularization.drop_connect`).
    """

    def __init__(self, cell: Cell, *, reverse: bool = False, gradients: str = DEFAULTS.gradients,
                 weight_drop: float = DEFAULTS.weight_drop) -> None:
        super().__init__()
        if not isinstance(cell, Cell):
            raise TypeError(f"cell must be a Cell (RNNCell, GRUCell, LSTMCell, or make_cell's); got {cell!r}")
        arguments.flags(reverse=reverse)
        if gradients not in choices("model.gradients"):
            raise ValueError(f"gradients must be one of {', '.join(choices('model.gradients'))}; got {gradients!r}")
        if not 0.0 <= weight_drop < 1.0:
            raise ValueError(f"weight_drop must be in [0, 1); got {weight_drop}")
        self.cell, self.reverse, self.gradients, self.weight_drop = cell, reverse, gradients, weight_drop

    def weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """The cell's stacked (W_recurrent, W_input, b), the recurrent half dropped in training."""
        W_recurrent, W_input, b = self.cell.stacked_weights()
        if self.training and self.weight_drop > 0:
            W_recurrent = drop_connect(W_recurrent, self.weight_drop)
        return W_recurrent, W_input, b

    def extra_repr(self) -> str:
        return f"reverse={self.reverse}, gradients={self.gradients}, weight_drop={self.weight_drop}"

    def forward(self, x: Tensor, state: tuple[Tensor, ...] | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
        check_input(self.cell, x)
        B, T, _ = x.shape
        if state is None:
            state = self.cell.initial_state(B, device=x.device, dtype=x.dtype)
        check_state(self.cell, state, x, same_type=self.gradients == "manual")
        if T == 0:
            return x.new_zeros(B, 0, self.cell.hidden_size), state
        W_recurrent, W_input, b = self.weights()
        if self.gradients == "manual":
            return _manual_layer(self.cell, x, state, reverse=self.reverse, weights=(W_recurrent, W_input, b),
                                 route=None)
        x_projected = nn.functional.linear(x, W_input, b)                   # (B, T, G*H)
        # unbind, not x[:, t]: indexing makes autograd build a full-size zero gradient per step
        steps = x_projected.unbind(1)
        outputs = []
        for x_t in reversed(steps) if self.reverse else steps:
            state = self.cell.step(x_t, state, W_recurrent)
            outputs.append(state[0])                                         # a(t): (B, H)
        if self.reverse:
            outputs.reverse()
        return torch.stack(outputs, dim=1), state                           # (B, T, H)


class BidirectionalLayer(nn.Module):
    """The lecture's bidirectional RNN: a forward and a reversed layer over the same input, their
    outputs side by side, `[a→(t), a←(t)]` (B, T, 2H). Each direction has its own weights."""

    def __init__(self, left_to_right_cell: Cell, right_to_left_cell: Cell, *, gradients: str = DEFAULTS.gradients,
                 weight_drop: float = DEFAULTS.weight_drop) -> None:
        super().__init__()
        self.left_to_right_layer = RecurrentLayer(left_to_right_cell, gradients=gradients, weight_drop=weight_drop)
        self.right_to_left_layer = RecurrentLayer(right_to_left_cell, reverse=True, gradients=gradients,
                                                  weight_drop=weight_drop)

    def forward(self, x: Tensor, state: tuple | None = None) -> tuple[Tensor, tuple]:
        if state is not None and (not isinstance(state, (tuple, list)) or len(state) != 2):
            raise ValueError("a bidirectional layer's state must be the pair (left to right, right to left)")
        left_state, right_state = state if state is not None else (None, None)
        left_output, left_state = self.left_to_right_layer(x, left_state)
        right_output, right_state = self.right_to_left_layer(x, right_state)
        return torch.cat([left_output, right_output], dim=-1), (left_state, right_state)


class RecurrentStack(nn.Module):
    """The deep RNN: `num_layers` layers, layer l reading layer l-1's outputs a[l-1](t), with
    dropout between layers (Zaremba et al. 2014: dropout on the non-recurrent connections only), the
    same mask at every step with `locked_dropout` (Gal & Ghahramani 2016), and DropConnect on every
    layer's recurrent weights with `weight_drop` (Merity et al. 2017). `cell_options` (e.g.
    `relevance_gate`, `gru_reset`) go to every cell."""

    def __init__(self, cell: str, input_size: int, hidden_size: int, *, num_layers: int = DEFAULTS.num_layers,
                 dropout: float = DEFAULTS.dropout, bidirectional: bool = False, gradients: str = DEFAULTS.gradients,
                 locked_dropout: bool = DEFAULTS.locked_dropout, weight_drop: float = DEFAULTS.weight_drop,
                 **cell_options) -> None:
        num_layers = arguments.size("num_layers", num_layers)
        arguments.flags(bidirectional=bidirectional, locked_dropout=locked_dropout)
        super().__init__()
        directions = 2 if bidirectional else 1
        sizes = [input_size] + [directions * hidden_size] * (num_layers - 1)
        new_cell = lambda size: make_cell(cell, size, hidden_size, **cell_options)  # noqa: E731
        self.layers = nn.ModuleList(
            BidirectionalLayer(new_cell(size), new_cell(size), gradients=gradients, weight_drop=weight_drop)
            if bidirectional else RecurrentLayer(new_cell(size), gradients=gradients, weight_drop=weight_drop)
            for size in sizes)
        self.dropout = SequenceDropout(dropout, locked=locked_dropout)
        self.weight_drop = weight_drop

    def initial_state(self, batch_size: int, **kwargs) -> list:
        """Zeros for every layer (a (left to right, right to left) pair per bidirectional layer)."""
        zeros = lambda layer: layer.cell.initial_state(batch_size, **kwargs)  # noqa: E731
        return [(zeros(layer.left_to_right_layer), zeros(layer.right_to_left_layer))
                if isinstance(layer, BidirectionalLayer) else zeros(layer) for layer in self.layers]

    def forward(self, x: Tensor, state: list | None = None) -> tuple[Tensor, list]:
        state = state if state is not None else [None] * len(self.layers)
        if not isinstance(state, (list, tuple)) or len(state) != len(self.layers):
            got = f"{len(state)} entries" if isinstance(state, (list, tuple)) else type(state).__name__
            raise ValueError(f"state must hold one entry per layer ({len(self.layers)}); got {got}")
        new_state = []
        for index, (layer, layer_state) in enumerate(zip(self.layers, state, strict=True)):
            if index > 0:
                x = self.dropout(x)
            x, layer_state = layer(x, layer_state)
            new_state.append(layer_state)
        return x, new_state
