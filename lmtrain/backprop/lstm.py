"""The LSTM's backpropagation through time, in the style of the lecture's Backpropagation slide
(docs/backprop.md derives each line). The forward keeps c(t), tanh(c(t)) and the gate activations
of every step; the backward walks t = T .. 1 computing only the recurrence, then sums each weight
gradient over time as one product (`lmtrain/backprop/sequence.py`). Both time loops also exist
compiled (`lmtrain/speed/csrc`); the tests check the two give the same numbers.
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
    sigmoid_slopes,
    state_buffer,
    summed_over_time,
    tanh_slopes,
)
from lmtrain.speed.gemm import FixedProduct
from lmtrain.speed.route import runs_on_its_route


@runs_on_its_route
class LSTMFunction(Function):
    """The LSTM over a whole sequence. Inputs: x, a(0), c(0), W_recurrent (4H, H), W_input (4H, E),
    b (4H,), gates (f, u, c, o). Outputs: a(1..T) (B, T, H), a(T) and c(T). The time loops are the
    compiled ones where the route has them and `Route.time_loops` says they run this sequence; the
    forward's choice is the backward's."""

    @staticmethod
    def forward(ctx, route, x, a0, c0, W_recurrent, W_input, b):
        ctx.set_materialize_grads(False)
        T = x.size(1)
        a, c = state_buffer(a0, T), state_buffer(c0, T)                    # (T+1, B, H)
        gates = project_inputs(x, W_input, b, route)                       # (T, B, 4H)
        tanh_c = torch.empty_like(c[1:])                                   # tanh(c(t))
        a_low = None                                                       # bfloat16 copies of a(t)
        ctx.loops = route.time_loops(T)
        if ctx.loops is not None:                                          # _lstm_forward_loop, compiled
            a_low = route.low_copy(a, a.size(-1))
            ctx.loops.lstm_forward(gates, a, c, tanh_c, W_recurrent.detach().contiguous(), a_low)
        else:
            _lstm_forward_loop(gates, a, c, tanh_c, FixedProduct(W_recurrent, x.size(0), T, route))
        ctx.save_for_backward(x, a, c, gates, tanh_c, W_recurrent, W_input, a_low)
        return (*layer_outputs(a), c[-1].clone())

    @staticmethod
    def backward(ctx, grad_outputs, grad_a_final, grad_c_final):
        x, a, c, gates, tanh_c, W_recurrent, W_input, a_low = ctx.saved_tensors
        T = tanh_c.size(0)
        dA = incoming_gradients(grad_outputs, grad_a_final, a)
        dc = grad_c_final if grad_c_final is not None else torch.zeros_like(dA[T])
        if ctx.loops is not None:                                          # _lstm_backward_loop, compiled
            dz_low = ctx.route.low_copy(gates, c.size(-1))
            dz, da, dc = ctx.loops.lstm_backward(gates, c, tanh_c, dA, dc, W_recurrent.detach().contiguous(), dz_low)
        else:
            dz_low = None                                                  # the products lower dz themselves
            recurrent_t = FixedProduct(W_recurrent.t().contiguous(), dc.size(0), T, ctx.route)  # dz W_a: transposed
            dz, da, dc = _lstm_backward_loop(gates, c, tanh_c, dA, dc, recurrent_t)
        del dA  # freed before the products over all steps, where the backward's memory peaks
        needs = ctx.needs_input_grad[1:]
        # With bfloat16 products the compiled loops made bfloat16 copies of a(t) and dz(t): the products read those.
        dz_factor, a_factor = (dz, a) if dz_low is None else (dz_low, a_low)
        dW_recurrent = summed_over_time(dz_factor, a_factor[:-1], ctx.route) if needs[3] else None  # Σ_t dz(t) a(t-1)ᵀ
        dx, dW_input, db = input_gradients(needs[:1] + needs[4:], dz, x, W_input, ctx.route, dz_factor)
        return dx, da, dc, dW_recurrent, dW_input, db


def _lstm_forward_loop(gates: Tensor, a: Tensor, c: Tensor, tanh_c: Tensor, recurrent: FixedProduct) -> None:
    """t = 1 .. T of the LSTM forward, in place: `gates` (T, B, 4H) arrives holding W_x x(t) + b and
    leaves holding [Γ_f, Γ_u, c̃, Γ_o]; a[t], c[t] (T+1, B, H) and tanh_c[t-1] = tanh(c(t)) are filled."""
    H = a.size(2)
    z, gamma_fu, gamma_f, gamma_u, c_tilde, gamma_o, a_, c_, tanh_c_ = per_step(
        gates, gates[..., :2 * H], *gates.split(H, -1), a, c, tanh_c)      # gates: [Γ_f, Γ_u, c̃, Γ_o] of each step
    for t in range(1, a.size(0)):
        z_t = recurrent(a_[t - 1], z[t - 1])                               # z = W [a(t-1), x(t)] + b
        torch.sigmoid(z_t[:, :2 * H], out=gamma_fu[t - 1])                 # Γ_f, Γ_u = σ(z_f), σ(z_u)
        torch.tanh(z_t[:, 2 * H:3 * H], out=c_tilde[t - 1])                # c̃ = tanh(z_c)
        torch.sigmoid(z_t[:, 3 * H:], out=gamma_o[t - 1])                  # Γ_o = σ(z_o)
        torch.mul(gamma_f[t - 1], c_[t - 1], out=c_[t]).addcmul_(gamma_u[t - 1], c_tilde[t - 1])  # c(t)
        torch.mul(gamma_o[t - 1], torch.tanh(c_[t], out=tanh_c_[t - 1]), out=a_[t])  # a(t) = Γ_o tanh(c(t))


def _lstm_backward_loop(gates: Tensor, c: Tensor, tanh_c: Tensor, dA: Tensor, dc: Tensor,
                        recurrent_t: FixedProduct) -> tuple[Tensor, Tensor, Tensor]:
    """t = T .. 1 of the LSTM backward, from the forward's activations `gates` [Γ_f, Γ_u, c̃, Γ_o]
    (T, B, 4H), c (T+1, B, H) and tanh(c(t)) (T, B, H); `dA` is what reaches a(t) from outside the
    recurrence, `dc` what reaches c(T). Returns dz (T, B, 4H), the gradients of every step's gate
    pre-activations, then da(0) and dc(0)."""
    T, H = tanh_c.size(0), tanh_c.size(2)
    gamma_f, gamma_u, c_tilde, gamma_o = gates.split(H, dim=2)
    # dz starts as what multiplies dc(t) (f, u, c) or da(t) (o), for all t at once; the loop
    # multiplies that gradient in.
    dz = sigmoid_slopes(gates)                                             # Γ (1 - Γ)
    dz[..., :H] *= c[:-1]                                                  # dz_f = dc c(t-1) Γ_f (1 - Γ_f)
    dz[..., H:2 * H] *= c_tilde                                            # dz_u = dc c̃ Γ_u (1 - Γ_u)
    torch.mul(gamma_u, tanh_slopes(c_tilde), out=dz[..., 2 * H:3 * H])     # dz_c = dc Γ_u (1 - c̃²)
    dz[..., 3 * H:] *= tanh_c                                              # dz_o = da tanh(c(t)) Γ_o (1 - Γ_o)
    through_a = tanh_slopes(tanh_c).mul_(gamma_o)                          # ∂a(t)/∂c(t) = Γ_o (1 - tanh²(c(t)))
    dz_, dz_fuc, dz_o, through_a_, forget, dA_ = per_step(
        dz, dz[..., :3 * H].unflatten(-1, (3, H)), dz[..., 3 * H:], through_a, gamma_f, dA)
    da = dA_[T]
    for t in range(T, 0, -1):
        dc = torch.addcmul(dc, da, through_a_[t - 1])                      # dc(t) += da(t) ∂a(t)/∂c(t)
        dz_fuc[t - 1].mul_(dc.unsqueeze(1))                                # dz_f, dz_u, dz_c
        dz_o[t - 1].mul_(da)                                               # dz_o
        dc = dc * forget[t - 1]                                            # ∂c(t)/∂c(t-1) = Γ_f
        da = recurrent_t(dz_[t - 1], dA_[t - 1])                           # ∂z(t)/∂a(t-1) = W_aᵀ (recurrent half)
    return dz, da, dc
