"""The gates' weights stacked for the layers: each gate's W = [W_aa, W_ax] (H, H + E) and bias b (H,) into
W_recurrent (G*H, H), W_input (G*H, E) and b (G*H,), the shapes the layer Functions and the input product
over all time steps take.

Stacking by autograd's slicing and concatenation costs the backward memory: the gradient of each half
`W[:, :H]`, `W[:, H:]` is a zero-filled (H, H + E) tensor with the half copied in, and the two are then
added, three W-sized buffers per gate where one is needed. Here each gate's gradient is made once,
`[dW_recurrent rows of the gate, dW_input rows of the gate]` side by side.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable


class StackedGates(Function):
    """`apply(H, W_1, ..., W_G, b_1, ..., b_G)` -> (W_recurrent, W_input, b), each one contiguous tensor."""

    @staticmethod
    def forward(ctx, H: int, *parameters: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        G = len(parameters) // 2
        W, b = parameters[:G], parameters[G:]
        ctx.H, ctx.G = H, G
        return torch.cat([W_gate[:, :H] for W_gate in W]), torch.cat([W_gate[:, H:] for W_gate in W]), torch.cat(b)

    @staticmethod
    @once_differentiable
    def backward(ctx, dW_recurrent: Tensor, dW_input: Tensor, db: Tensor) -> tuple[Tensor | None, ...]:
        H, G = ctx.H, ctx.G
        dW = [torch.cat([dW_recurrent[g * H:(g + 1) * H], dW_input[g * H:(g + 1) * H]], dim=1) for g in range(G)]
        return (None, *dW, *db.split(H))


def stack_gates(weights: list[Tensor], biases: list[Tensor], H: int) -> tuple[Tensor, Tensor, Tensor]:
    """(W_recurrent (G*H, H), W_input (G*H, E), b (G*H,)) from the gates' (H, H + E) weights and (H,) biases."""
    return StackedGates.apply(H, *weights, *biases)
