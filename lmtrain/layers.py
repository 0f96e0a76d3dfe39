"""Running cells over time: a layer runs one cell along a sequence (left to right, or right to left),
a bidirectional layer runs one of each, and a stack of either is the lecture's deep RNN.

Batch-first throughout: inputs are (B, T, E), outputs (B, T, H), or (B, T, 2H) when bidirectional.
A layer's state is its cell's state; a bidirectional layer's state is the pair (forward, backward);
a stack's state is a list with one entry per layer. A missing state means `a(0) = 0`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmtrain.backward import manual_layer
from lmtrain.cells import Cell, make_cell
from lmtrain.config import ModelConfig
from lmtrain.regularization import SequenceDropout, drop_connect

BACKWARDS = ("autograd", "manual")
DEFAULTS = ModelConfig()  # the constructors' defaults are the config's: the route `lmtrain train` takes


class RecurrentLayer(nn.Module):
    """One cell applied at every time step, left to right (or right to left with `reverse=True`).

    The input half of every gate, `W_x x(t) + b`, is one matrix product over all T steps before the
    loop; the loop then adds only the recurrent half (`Cell.step`). Same maths as calling the
    cell's line-by-line `forward` at each step, a test proves it. `backward="manual"` runs the
    hand-written backpropagation through time of `lmtrain.backward` instead of autograd's.
    `weight_drop` > 0: in training, DropConnect on the recurrent weights, one mask per call
    (`regularization.drop_connect`).
    """

    def __init__(self, cell: Cell, *, reverse: bool = False, backward: str = DEFAULTS.backward,
                 weight_drop: float = DEFAULTS.weight_drop) -> None:
        super().__init__()
        if backward not in BACKWARDS:
            raise ValueError(f"backward must be one of {BACKWARDS}; got {backward!r}")
        if not 0.0 <= weight_drop < 1.0:
            raise ValueError(f"weight_drop must be in [0, 1); got {weight_drop}")
        self.cell, self.reverse, self.backward, self.weight_drop = cell, reverse, backward, weight_drop

    def weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """The cell's stacked (W_recurrent, W_input, b), the recurrent half dropped in training."""
        W_recurrent, W_input, b = self.cell.stacked_weights()
        if self.training and self.weight_drop > 0:
            W_recurrent = drop_connect(W_recurrent, self.weight_drop)
        return W_recurrent, W_input, b

    def extra_repr(self) -> str:
        return f"reverse={self.reverse}, backward={self.backward}, weight_drop={self.weight_drop}"

    def forward(self, x: Tensor, state: tuple[Tensor, ...] | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
        B, T, _ = x.shape
        if state is None:
            state = self.cell.initial_state(B, device=x.device, dtype=x.dtype)
        if T == 0:
            return x.new_zeros(B, 0, self.cell.hidden_size), state
        W_recurrent, W_input, b = self.weights()
        if self.backward == "manual":
            return manual_layer(self.cell, x, state, reverse=self.reverse, weights=(W_recurrent, W_input, b))
        x_projected = nn.functional.linear(x, W_input, b)                   # (B, T, G*H)
        steps = x_projected.unbind(1)  # unbind, not x[:, t]: indexing makes autograd build a full-size zero gradient per step
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

    def __init__(self, forward_cell: Cell, backward_cell: Cell, *, backward: str = DEFAULTS.backward,
                 weight_drop: float = DEFAULTS.weight_drop) -> None:
        super().__init__()
        self.forward_layer = RecurrentLayer(forward_cell, backward=backward, weight_drop=weight_drop)
        self.backward_layer = RecurrentLayer(backward_cell, reverse=True, backward=backward, weight_drop=weight_drop)

    def forward(self, x: Tensor, state: tuple | None = None) -> tuple[Tensor, tuple]:
        forward_state, backward_state = state if state is not None else (None, None)
        forward_output, forward_state = self.forward_layer(x, forward_state)
        backward_output, backward_state = self.backward_layer(x, backward_state)
        return torch.cat([forward_output, backward_output], dim=-1), (forward_state, backward_state)


class RecurrentStack(nn.Module):
    """The deep RNN: `num_layers` layers, layer l reading layer l-1's outputs a[l-1](t), with
    dropout between layers (Zaremba et al. 2014: dropout on the non-recurrent connections only), the
    same mask at every step with `locked_dropout` (Gal & Ghahramani 2016), and DropConnect on every
    layer's recurrent weights with `weight_drop` (Merity et al. 2017). `cell_options` (e.g.
    `relevance_gate`, `gru_reset`) go to every cell."""

    def __init__(self, cell: str, input_size: int, hidden_size: int, *, num_layers: int = DEFAULTS.num_layers,
                 dropout: float = DEFAULTS.dropout, bidirectional: bool = False, backward: str = DEFAULTS.backward,
                 locked_dropout: bool = DEFAULTS.locked_dropout, weight_drop: float = DEFAULTS.weight_drop,
                 **cell_options) -> None:
        super().__init__()
        directions = 2 if bidirectional else 1
        sizes = [input_size] + [directions * hidden_size] * (num_layers - 1)
        new_cell = lambda size: make_cell(cell, size, hidden_size, **cell_options)  # noqa: E731
        self.layers = nn.ModuleList(
            BidirectionalLayer(new_cell(size), new_cell(size), backward=backward, weight_drop=weight_drop)
            if bidirectional else RecurrentLayer(new_cell(size), backward=backward, weight_drop=weight_drop)
            for size in sizes)
        self.dropout = SequenceDropout(dropout, locked=locked_dropout)
        self.weight_drop = weight_drop

    def initial_state(self, batch_size: int, **kwargs) -> list:
        """Zeros for every layer (a (forward, backward) pair per bidirectional layer)."""
        zeros = lambda layer: layer.cell.initial_state(batch_size, **kwargs)  # noqa: E731
        return [(zeros(layer.forward_layer), zeros(layer.backward_layer)) if isinstance(layer, BidirectionalLayer)
                else zeros(layer) for layer in self.layers]

    def forward(self, x: Tensor, state: list | None = None) -> tuple[Tensor, list]:
        state = state if state is not None else [None] * len(self.layers)
        new_state = []
        for index, (layer, layer_state) in enumerate(zip(self.layers, state, strict=True)):
            if index > 0:
                x = self.dropout(x)
            x, layer_state = layer(x, layer_state)
            new_state.append(layer_state)
        return x, new_state
