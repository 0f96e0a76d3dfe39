"""The tanh RNN's backpropagation through time, from the lecture's Backpropagation slide:

    a(t) = tanh(W_ax x(t) + W_aa a(t-1) + b)
    ∂tanh(z)/∂z = 1 - tanh(z)²
    ∂a(t)/∂W_ax = (1 - a(t)²) x(t)ᵀ        ∂a(t)/∂W_aa = (1 - a(t)²) a(t-1)ᵀ
    ∂a(t)/∂b    = Σ_batch (1 - a(t)²)      ∂a(t)/∂x(t) = W_axᵀ (1 - a(t)²)
    ∂a(t)/∂a(t-1) = W_aaᵀ (1 - a(t)²)

The forward keeps every a(t); the backward walks t = T .. 1 computing only the recurrence, then sums
each weight gradient over time as one product (`lmtrain/backprop/sequence.py`). Both time loops also
exist compiled (`lmtrain/speed/csrc/rnn_loops.h`); the tests check the two give the same numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Function

from lmtrain.backprop.sequence import (
    incoming_gradients,
    input_gradients,
    layer_outputs,
    per_step,
    project_inputs,
    state_buffer,
    summed_over_time,
    tanh_slopes,
)
from lmtrain.speed.gemm import FixedProduct
from lmtrain.speed.route import runs_on_its_route


@runs_on_its_route
class RNNFunction(Function):
    """The tanh RNN over a whole sequence. Inputs: x (B, T, E), a(0) (B, H), W_aa (H, H), W_ax (H, E),
    b (H,). Outputs: a(1..T) (B, T, H) and a(T) (B, H). The time loops are the compiled ones where
    `Route.time_loops` has them; the forward's choice is the backward's."""

    @staticmethod
    def forward(ctx, route, x, a0, W_aa, W_ax, b):
        ctx.set_materialize_grads(False)
        T = x.size(1)
        a = state_buffer(a0, T)                                            # (T+1, B, H)
        z = project_inputs(x, W_ax, b, route)                              # z[t-1] = W_ax x(t) + b
        a_low = None                                                       # bfloat16 copies of a(t)
        ctx.loops = route.time_loops(T)
        if ctx.loops is not None:                                          # _rnn_forward_loop, compiled
            a_low = route.low_copy(a, a.size(-1))
            ctx.loops.rnn_forward(z, a, W_aa.detach().contiguous(), a_low)
        else:
            _rnn_forward_loop(z, a, FixedProduct(W_aa, x.size(0), T, route))
        ctx.save_for_backward(x, a, W_aa, W_ax, a_low)
        return layer_outputs(a)

    @staticmethod
    def backward(ctx, grad_outputs, grad_final):
        x, a, W_aa, W_ax, a_low = ctx.saved_tensors
        T, needs = a.size(0) - 1, ctx.needs_input_grad[1:]
        dA = incoming_gradients(grad_outputs, grad_final, a)
        dz_low = None                                                      # the Python loops' products lower dz
        if ctx.loops is not None:                                          # _rnn_backward_loop, compiled
            dz_low = ctx.route.low_copy(a[1:], a.size(-1))
            dz, da = ctx.loops.rnn_backward(a, dA, W_aa.detach().contiguous(), dz_low)  # dz overwrites dA[1:]
        else:                                                              # dz W_aa: the product transposed
            dz, da = _rnn_backward_loop(a, dA, FixedProduct(W_aa.t().contiguous(), a.size(1), T, ctx.route))
        # With bfloat16 products the compiled loops made bfloat16 copies of a(t) and dz(t): the products read those.
        dz_factor, a_factor = (dz, a) if dz_low is None else (dz_low, a_low)
        # ∂a(t)/∂W_aa = (1 - a(t)²) a(t-1)ᵀ
        dW_aa = summed_over_time(dz_factor, a_factor[:-1], ctx.route) if needs[2] else None
        # ∂a(t)/∂x(t), ∂a(t)/∂W_ax, ∂a(t)/∂b
        dx, dW_ax, db = input_gradients(needs[:1] + needs[3:], dz, x, W_ax, ctx.route, dz_factor)
        return dx, da, dW_aa, dW_ax, db


def _rnn_forward_loop(z: Tensor, a: Tensor, recurrent: FixedProduct) -> None:
    """t = 1 .. T of the RNN forward, filling a[t] (T+1, B, H) from z (T, B, H) = W_ax x(t) + b."""
    a_, z_ = per_step(a, z)
    for t in range(1, a.size(0)):
        torch.tanh(recurrent(a_[t - 1], z_[t - 1]), out=a_[t])             # a(t) = tanh(W_ax x(t) + W_aa a(t-1) + b)


def _rnn_backward_loop(a: Tensor, dA: Tensor, recurrent_t: FixedProduct) -> tuple[Tensor, Tensor]:
    """t = T .. 1 of the RNN backward from the forward's a (T+1, B, H); dA[t] is what reaches a(t) from
    outside the recurrence. Returns dz (T, B, H), the gradients of every step's pre-activation, and da(0)."""
    T = a.size(0) - 1
    dz = tanh_slopes(a[1:])                                                # (T, B, H): 1 - a(t)², times da(t) below
    dA_, dz_ = per_step(dA, dz)
    da = dA_[T]
    for t in range(T, 0, -1):
        dz_[t - 1].mul_(da)                                                # dz = da * (1 - a(t)²)
        da = recurrent_t(dz_[t - 1], dA_[t - 1])                           # ∂a(t)/∂a(t-1) = W_aaᵀ (1 - a(t)²)
    return dz, da
