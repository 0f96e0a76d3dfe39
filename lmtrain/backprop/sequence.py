"""What the three Functions share: time-major buffers, the input half of every gate in one product,
the slopes of σ and tanh from their saved outputs, and the weight gradients summed over time as one
product each.

Inside the Functions everything is time-major: a[t] = a(t) for t = 0 .. T in a (T+1, B, H) buffer,
per-step buffers (gates, dz) (T, B, ...) indexed t-1 for step t. Rows are "(t, batch)" pairs, so a
(T, B, K) buffer seen as (T*B, K) is X, dZ or A_prev of the formulas. Rows are batch, as in
`lmtrain/model/cells.py`, so the slide's column-vector `W dz` is `dz @ W` here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmtrain.speed.gemm import linear, mm, times_weight
from lmtrain.speed.route import Route


def time_major_rows(x: Tensor) -> Tensor:
    """(B, T, E) batch-first -> (T*B, E) time-major rows (a view when x came time-major)."""
    return x.transpose(0, 1).flatten(0, 1)


def project_inputs(x: Tensor, W_input: Tensor, b: Tensor, route: Route) -> Tensor:
    """`W_x x(t) + b` of every gate for all T steps in one product, time-major (T, B, G*H): the loop
    then adds only the recurrent half, `W_a a(t-1)`."""
    return linear(time_major_rows(x), W_input, b, route).unflatten(0, (x.size(1), x.size(0)))


def state_buffer(initial: Tensor, T: int) -> Tensor:
    """A (T+1, B, H) buffer whose [t] will hold a(t) (or c(t)); [0] is the initial state."""
    states = initial.new_empty(T + 1, *initial.shape)
    states[0] = initial
    return states


def per_step(*buffers: Tensor) -> list[tuple[Tensor, ...]]:
    """Each (T, ...) buffer as its T step views, made once: indexing inside a loop costs as much as
    the small operations themselves."""
    return [buffer.unbind(0) for buffer in buffers]


def layer_outputs(a: Tensor) -> tuple[Tensor, Tensor]:
    """The Function's outputs: a(1..T) (B, T, H) and the final a(T), copies rather than views of the
    buffer, laid out like the autograd layer's: `dropout` then draws the same mask for both, and the
    caller may change them in place."""
    return a[1:].transpose(0, 1).contiguous(), a[-1].clone()


def incoming_gradients(grad_outputs: Tensor | None, grad_final: Tensor | None, a: Tensor) -> Tensor:
    """dA[t] = ∂L/∂a(t) from outside the recurrence (the outputs, the final state); dA[0] = 0."""
    dA = torch.empty_like(a)                                               # (T+1, B, H)
    dA[0] = 0
    if grad_outputs is None:
        dA[1:] = 0
    else:
        dA[1:] = grad_outputs.transpose(0, 1)
    if grad_final is not None:
        dA[-1] += grad_final
    return dA


def sigmoid_slopes(gates: Tensor) -> Tensor:
    """σ'(z) = Γ (1 - Γ) = Γ - Γ² for every saved activation Γ = σ(z), all steps at once."""
    return torch.addcmul(gates, gates, gates, value=-1)


def tanh_slopes(activations: Tensor) -> Tensor:
    """∂tanh(z)/∂z = 1 - tanh(z)², from the saved tanh(z), all steps at once."""
    return torch.addcmul(activations.new_ones(()), activations, activations, value=-1)


def summed_over_time(dz: Tensor, inputs: Tensor, route: Route, out: Tensor | None = None) -> Tensor:
    """Σ_t Σ_batch dz(t) input(t)ᵀ as one product: (T, B, K), (T, B, H) -> (K, H), into `out` if given."""
    return mm(dz.flatten(0, 1).t(), inputs.flatten(0, 1), route, out)


def input_gradients(needs: tuple[bool, ...], dz: Tensor, x: Tensor, W_input: Tensor, route: Route,
                    dz_factor: Tensor | None = None):
    """dx(t) = W_inputᵀ dz(t), dW_input = Σ_t dz(t) x(t)ᵀ, db = Σ_t Σ_batch dz(t): one product each
    over all T*B rows. `needs` says which of (x, W_input, b) want a gradient; `dz_factor`, dz as the
    products' factor (a bfloat16 copy already made), is dz itself if not given."""
    dz_rows = dz.flatten(0, 1)                                             # (T*B, G*H)
    factor_rows = dz_rows if dz_factor is None else dz_factor.flatten(0, 1)
    # dW first: its time-major copy of x is freed before dx is made, one (T, B, E) buffer less at the peak.
    dW_input = mm(factor_rows.t(), time_major_rows(x), route) if needs[1] else None
    dx = times_weight(factor_rows, W_input, route).unflatten(0, dz.shape[:2]).transpose(0, 1) if needs[0] else None
    db = dz_rows.sum(0) if needs[2] else None
    return dx, dW_input, db
