"""Running cells over time: a layer runs one cell along a sequence, a stack is the lecture's deep RNN.

Batch-first throughout: inputs are (B, T, E), outputs (B, T, H). A layer's state is its cell's
state; a stack's state is a list with one cell state per layer. A missing state means `a(0) = 0`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmtrain.cells import Cell, make_cell


class RecurrentLayer(nn.Module):
    """One cell applied at every time step, left to right (or right to left with `reverse=True`).

    The input half of every gate, `W_x x(t) + b`, is one matrix product over all T steps before the
    loop; the loop then adds only the recurrent half (`Cell.step`). Same maths as calling the
    cell's line-by-line `forward` at each step, a test proves it.
    """

    def __init__(self, cell: Cell, *, reverse: bool = False) -> None:
        super().__init__()
        self.cell, self.reverse = cell, reverse

    def forward(self, x: Tensor, state: tuple[Tensor, ...] | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
        B, T, _ = x.shape
        if state is None:
            state = self.cell.initial_state(B, device=x.device, dtype=x.dtype)
        W_recurrent, W_input, b = self.cell.stacked_weights()
        x_projected = nn.functional.linear(x, W_input, b)                   # (B, T, G*H)
        steps = x_projected.unbind(1)  # unbind, not x[:, t]: indexing makes autograd build a full-size zero gradient per step
        outputs = []
        for x_t in reversed(steps) if self.reverse else steps:
            state = self.cell.step(x_t, state, W_recurrent)
            outputs.append(state[0])                                         # a(t): (B, H)
        if self.reverse:
            outputs.reverse()
        if not outputs:
            return x.new_zeros(B, 0, self.cell.hidden_size), state
        return torch.stack(outputs, dim=1), state                           # (B, T, H)


class RecurrentStack(nn.Module):
    """The deep RNN: `num_layers` layers, layer l reading layer l-1's outputs a[l-1](t), with
    dropout between layers (Zaremba et al. 2014: dropout on the non-recurrent connections only)."""

    def __init__(self, cell: str, input_size: int, hidden_size: int, *, num_layers: int = 1,
                 dropout: float = 0.0, relevance_gate: bool = True) -> None:
        super().__init__()
        sizes = [input_size] + [hidden_size] * (num_layers - 1)
        self.layers = nn.ModuleList(
            RecurrentLayer(make_cell(cell, size, hidden_size, relevance_gate=relevance_gate)) for size in sizes)
        self.dropout = nn.Dropout(dropout)

    def initial_state(self, batch_size: int, **kwargs) -> list[tuple[Tensor, ...]]:
        return [layer.cell.initial_state(batch_size, **kwargs) for layer in self.layers]

    def forward(self, x: Tensor, state: list[tuple[Tensor, ...]] | None = None
                ) -> tuple[Tensor, list[tuple[Tensor, ...]]]:
        state = state if state is not None else [None] * len(self.layers)
        new_state = []
        for index, (layer, layer_state) in enumerate(zip(self.layers, state, strict=True)):
            if index > 0:
                x = self.dropout(x)
            x, layer_state = layer(x, layer_state)
            new_state.append(layer_state)
        return x, new_state
