"""A language model's step for one token a row, as sampling takes it: the compiled kernels'
`*_token_step` for each layer, its weights packed once for all the tokens of a call.

A token's step through the model's own forward is some forty small operator calls (the layers are
built for whole sequences: an input product over all steps, an autograd Function, the loop), and at a
few rows those calls, not the arithmetic, took most of its time (docs/benchmarks.md, "Sampling"). Here
it is one compiled call per layer, z = W_a [a(t-1), x(t)] + b with the lecture's combined W_a, then the
cell's equations (lmtrain/speed/csrc/token_steps.h), plus the embedding and the output layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

COLUMNS = 16  # a packed block's width: the kernels' COLUMNS (csrc/recurrent_products.h)


def pack(gate_weights: Sequence[Tensor]) -> Tensor:
    """Each gate's W_a (H, K) into the kernels' (blocks, G, K, 16): block j holds each gate's columns for
    units 16 j .. 16 j + 15, zero past H. One copy of each weight, no stacked copy first."""
    H, K = gate_weights[0].shape
    whole, rest = divmod(H, COLUMNS)
    packed = gate_weights[0].new_empty(whole + (rest > 0), len(gate_weights), K, COLUMNS)
    if rest:
        packed[whole].zero_()
    for gate, W in enumerate(gate_weights):
        by_unit = packed[:, gate].transpose(1, 2)                         # (blocks, 16, K), a view
        by_unit[:whole].copy_(W[:whole * COLUMNS].reshape(whole, COLUMNS, K))
        if rest:
            by_unit[whole, :rest].copy_(W[whole * COLUMNS:])
    return packed


@dataclass(frozen=True)
class LayerWeights:
    """One layer's weights for `TokenStep`: `cell` "lstm", "gru" or "rnn", each gate's W_a = [W_aa, W_ax]
    (H, H + E) in the cell's gate order, the gates' biases stacked (G H,), and PyTorch's GRU's recurrent
    candidate bias b_cc."""

    cell: str
    W_a: tuple[Tensor, ...]
    b: Tensor
    b_cc: Tensor | None = None


class TokenStep:
    """`(tokens (B,), state) -> (logits (B, V), state)`: what `model(tokens[:, None], state)` returns
    for the last position, the state a list of per-layer tuples as the model's."""

    def __init__(self, loops: ModuleType, layers: list[LayerWeights], embedding: Tensor, W_y: Tensor,
                 b_y: Tensor) -> None:
        self.loops, self.embedding, self.W_y, self.b_y = loops, embedding, W_y, b_y
        self.layers = [(layer.cell, pack(layer.W_a), layer.b.contiguous(), layer.b_cc)
                       for layer in layers]

    def __call__(self, tokens: Tensor, state: list[tuple[Tensor, ...]]) -> tuple[Tensor, list[tuple[Tensor, ...]]]:
        x = self.embedding.index_select(0, tokens)                          # x(t) = E[token]
        new_state = []
        for (cell, packed, b, b_cc), layer_state in zip(self.layers, state, strict=True):
            if cell == "lstm":
                a, c = self.loops.lstm_token_step(packed, b, layer_state[0].contiguous(), x,
                                                  layer_state[1].contiguous())
                new_state.append((a, c))
            elif cell == "gru":
                a = self.loops.gru_token_step(packed, b, layer_state[0].contiguous(), x, b_cc)
                new_state.append((a,))
            else:
                a = self.loops.rnn_token_step(packed, b, layer_state[0].contiguous(), x)
                new_state.append((a,))
            x = a
        return torch.addmm(self.b_y, x, self.W_y.t()), new_state            # W_y a(t) + b_y
