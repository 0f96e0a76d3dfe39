"""The GRU's backpropagation through time, in the style of the lecture's Backpropagation slide
(docs/backprop.md derives each line): the full and the simplified GRU with Γ_r applied before the
product (the lecture's), and PyTorch's variant with Γ_r applied after it. The forward keeps every
c(t) and gate activation; the backward walks t = T .. 1 computing only the recurrence, then sums each
weight gradient over time as one product (`lmtrain/backprop/sequence.py`). The time loops of both forms
also exist compiled (`lmtrain/speed/csrc/gru_loops.h`); the tests check the two give the same numbers.
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
from lmtrain.speed.route import Route, runs_on_its_route


@runs_on_its_route
class GRUFunction(Function):
    """The lecture's GRU, Γ_r applied to c(t-1) before the product (`gru_reset="before"`), with or without
    the relevance gate. Inputs: x, c(0), W_recurrent (G*H, H), W_input (G*H, E), b (G*H,), and
    relevance_gate (a bool: gates (u, r, c) or (u, c)). Outputs: c(1..T) (B, T, H) and c(T). The time
    loops are the compiled ones where `Route.time_loops` has them; the forward's choice is the backward's."""

    @staticmethod
    def forward(ctx, route, x, c0, W_recurrent, W_input, b, relevance_gate):
        ctx.set_materialize_grads(False)
        T = x.size(1)
        c = state_buffer(c0, T)                                            # (T+1, B, H)
        gates = project_inputs(x, W_input, b, route)                       # (T, B, G*H)
        c_low = None                                                       # bfloat16 copies of c(t)
        ctx.loops = route.time_loops(T)
        if ctx.loops is not None:                                          # _gru_forward_loop, compiled
            c_low = route.low_copy(c, c.size(-1))
            ctx.loops.gru_forward(gates, c, W_recurrent.detach().contiguous(), c_low)
        else:
            _gru_forward_loop(gates, c, W_recurrent, relevance_gate, route)
        ctx.relevance_gate = relevance_gate
        ctx.save_for_backward(x, c, gates, W_recurrent, W_input, c_low)
        return layer_outputs(c)

    @staticmethod
    def backward(ctx, grad_outputs, grad_final):
        x, c, gates, W_recurrent, W_input, c_low = ctx.saved_tensors
        H, relevance_gate, needs = c.size(-1), ctx.relevance_gate, ctx.needs_input_grad[1:]
        dA = incoming_gradients(grad_outputs, grad_final, c)
        dz_low = None                                                      # the Python loops' products lower dz
        if ctx.loops is not None:                                          # _gru_backward_loop, compiled
            dz_low = ctx.route.low_copy(gates, H)
            dz, dc = ctx.loops.gru_backward(gates, c, dA, W_recurrent.detach().contiguous(), dz_low)
        else:
            dz, dc = _gru_backward_loop(gates, c, dA, W_recurrent, relevance_gate, ctx.route)
        del dA  # freed before the products over all steps, where the backward's memory peaks
        # With bfloat16 products the compiled loops made bfloat16 copies of c(t) and dz(t): the products read those.
        dz_factor, c_factor = (dz, c) if dz_low is None else (dz_low, c_low)
        c_prev = c_factor[:-1]
        dW_recurrent = None
        if needs[2]:  # the gates read c(t-1), the candidate reads Γ_r * c(t-1)
            c_in = gates[..., H:2 * H] * c[:-1] if relevance_gate else c_prev
            # Each product straight into its rows: no pieces to concatenate, one W-sized buffer less.
            dW_recurrent = W_recurrent.new_empty(W_recurrent.shape)
            summed_over_time(dz_factor[..., :-H], c_prev, ctx.route, out=dW_recurrent[:-H])
            summed_over_time(dz_factor[..., -H:], c_in, ctx.route, out=dW_recurrent[-H:])
        dx, dW_input, db = input_gradients(needs[:1] + needs[3:5], dz, x, W_input, ctx.route, dz_factor)
        return dx, dc, dW_recurrent, dW_input, db, None


def _gru_forward_loop(gates: Tensor, c: Tensor, W_recurrent: Tensor, relevance_gate: bool, route: Route) -> None:
    """t = 1 .. T of the lecture's GRU forward, in place: `gates` (T, B, G*H) arrives holding W_x x(t) + b
    and leaves holding [Γ_u, (Γ_r,) c̃]; c[t] (T+1, B, H) is filled."""
    T, B, H = c.size(0) - 1, c.size(1), c.size(2)
    gamma, gamma_u, gamma_r, c_tilde, c_ = per_step(                       # gates: [Γ_u, (Γ_r,) c̃] of each step
        gates[..., :-H], gates[..., :H], gates[..., H:2 * H], gates[..., -H:], c)
    # recurrent halves: (W_u, W_r), W_c
    W_gates, W_c = FixedProduct(W_recurrent[:-H], B, T, route), FixedProduct(W_recurrent[-H:], B, T, route)
    for t in range(1, T + 1):
        torch.sigmoid(W_gates(c_[t - 1], gamma[t - 1]), out=gamma[t - 1])  # Γ_u, Γ_r = σ(W [c(t-1), x(t)] + b)
        c_in = gamma_r[t - 1] * c_[t - 1] if relevance_gate else c_[t - 1]  # Γ_r * c(t-1)
        torch.tanh(W_c(c_in, c_tilde[t - 1]), out=c_tilde[t - 1])          # c̃ = tanh(W_c [Γ_r * c(t-1), x(t)] + b_c)
        torch.lerp(c_[t - 1], c_tilde[t - 1], gamma_u[t - 1], out=c_[t])   # c(t) = Γ_u c̃ + (1 - Γ_u) c(t-1)


def _gru_backward_loop(gates: Tensor, c: Tensor, dA: Tensor, W_recurrent: Tensor, relevance_gate: bool,
                       route: Route) -> tuple[Tensor, Tensor]:
    """t = T .. 1 of the lecture's GRU backward from the forward's activations `gates` and c; dA[t] is what
    reaches c(t) from outside the recurrence. Returns dz (T, B, G*H), the gradients of every step's gate
    pre-activations, and dc(0)."""
    H = c.size(-1)
    c_prev, gamma_u, c_tilde = c[:-1], gates[..., :H], gates[..., -H:]
    # dz (T, B, G*H) starts as what multiplies the incoming gradient, for all t at once; the loop
    # multiplies that gradient in.
    dz = sigmoid_slopes(gates)                                             # Γ (1 - Γ)
    dz[..., :H] *= c_tilde - c_prev                                        # dz_u = dc (c̃ - c(t-1)) Γ_u (1 - Γ_u)
    if relevance_gate:
        dz[..., H:2 * H] *= c_prev                                         # dz_r = dc_in c(t-1) Γ_r (1 - Γ_r)
    torch.mul(gamma_u, tanh_slopes(c_tilde), out=dz[..., -H:])             # dz_c = dc Γ_u (1 - c̃²)
    loop = _gru_relevance_loop if relevance_gate else _gru_simplified_loop
    return dz, loop(dz, dA, 1 - gamma_u, gates, W_recurrent, route)


def _gru_relevance_loop(dz, dC, keep, gates, W_recurrent, route: Route):
    """t = T .. 1 for the full GRU (gates u, r, c): multiplies the incoming gradients into dz(t),
    returns dc(0)."""
    T, H = dC.size(0) - 1, dC.size(2)
    rows = dC.size(1)  # products with the transposed recurrent halves
    gates_t, candidate_t = (FixedProduct(W_recurrent[:-H].t().contiguous(), rows, T, route),
                            FixedProduct(W_recurrent[-H:].t().contiguous(), rows, T, route))
    dz_gates, dz_u, dz_r, dz_c, gamma_r, keep, dC = per_step(
        dz[..., :2 * H], *dz.split(H, -1), gates[..., H:2 * H], keep, dC)
    dc = dC[T]
    for t in range(T, 0, -1):
        dz_c[t - 1].mul_(dc)                                               # dz_c = dc Γ_u (1 - c̃²)
        dc_in = candidate_t(dz_c[t - 1])                                   # reaches the candidate's input Γ_r * c(t-1)
        dz_r[t - 1].mul_(dc_in)                                            # dz_r = dc_in c(t-1) Γ_r (1 - Γ_r)
        dz_u[t - 1].mul_(dc)                                               # dz_u = dc (c̃ - c(t-1)) Γ_u (1 - Γ_u)
        dc_prev = torch.addcmul(dC[t - 1], dc, keep[t - 1])                # c(t) = ... + (1 - Γ_u) c(t-1)
        dc_prev.addcmul_(dc_in, gamma_r[t - 1])                            # c̃ reads Γ_r * c(t-1)
        dc = gates_t(dz_gates[t - 1], dc_prev)                             # Γ_u, Γ_r read c(t-1)
    return dc


def _gru_simplified_loop(dz, dC, keep, gates, W_recurrent, route: Route):
    """t = T .. 1 for the simplified GRU (gates u, c): multiplies dc(t) into dz(t), returns dc(0)."""
    T, H = dC.size(0) - 1, dC.size(2)
    dz_, dz_uc, keep, dC = per_step(dz, dz.unflatten(-1, (2, H)), keep, dC)
    dc = dC[T]
    recurrent_t = FixedProduct(W_recurrent.t().contiguous(), dc.size(0), T, route)
    for t in range(T, 0, -1):
        # [dz_u, dz_c] = dc [(c̃ - c(t-1)) Γ_u (1 - Γ_u), Γ_u (1 - c̃²)], both blocks in one product
        dz_uc[t - 1].mul_(dc.unsqueeze(1))
        dc_prev = torch.addcmul(dC[t - 1], dc, keep[t - 1])                # c(t) = ... + (1 - Γ_u) c(t-1)
        dc = recurrent_t(dz_[t - 1], dc_prev)                              # both gates read c(t-1)
    return dc


@runs_on_its_route
class GRUAfterFunction(Function):
    """PyTorch's GRU (`gru_reset="after"`): c̃ = tanh(W_cx x(t) + b_c + Γ_r * p(t)), p(t) = W_cc c(t-1) + b_cc.
    Inputs: x, c(0), W_recurrent (3H, H), W_input (3H, E), b (3H,), b_cc (H,). Outputs as GRUFunction."""

    @staticmethod
    def forward(ctx, route, x, c0, W_recurrent, W_input, b, b_cc):
        ctx.set_materialize_grads(False)
        T = x.size(1)
        c = state_buffer(c0, T)                                            # (T+1, B, H)
        gates = project_inputs(x, W_input, b, route)                       # (T, B, 3H)
        p = torch.empty_like(c[1:])                                        # p(t) = W_cc c(t-1) + b_cc
        c_low = None                                                       # bfloat16 copies of c(t)
        ctx.loops = route.time_loops(T)
        if ctx.loops is not None:                                          # _gru_after_forward_loop, compiled
            c_low = route.low_copy(c, c.size(-1))
            ctx.loops.gru_after_forward(gates, c, p, W_recurrent.detach().contiguous(), b_cc.detach().contiguous(),
                                        c_low)
        else:
            _gru_after_forward_loop(gates, c, p, FixedProduct(W_recurrent, x.size(0), T, route), b_cc)
        ctx.save_for_backward(x, c, gates, p, W_recurrent, W_input, c_low)
        return layer_outputs(c)

    @staticmethod
    def backward(ctx, grad_outputs, grad_final):
        x, c, gates, p, W_recurrent, W_input, c_low = ctx.saved_tensors
        dA = incoming_gradients(grad_outputs, grad_final, c)
        dr_low = None                                                      # the Python loops' products lower dr
        if ctx.loops is not None:                                          # _gru_after_backward_loop, compiled
            dr_low = ctx.route.low_copy(gates, c.size(-1))
            dr, dz_c, dc = ctx.loops.gru_after_backward(gates, c, p, dA, W_recurrent.detach().contiguous(), dr_low)
        else:
            recurrent_t = FixedProduct(W_recurrent.t().contiguous(), c.size(1), gates.size(0), ctx.route)
            dr, dz_c, dc = _gru_after_backward_loop(gates, c, p, dA, recurrent_t)
        # Freed before the products over all steps, where the backward's memory peaks (compiled, dz_c
        # took its place: one buffer for both).
        del dA
        # With bfloat16 products the compiled loops made bfloat16 copies of c(t) and dr(t): the products read those.
        dr_factor, c_factor = (dr, c) if dr_low is None else (dr_low, c_low)
        H, needs = c.size(-1), ctx.needs_input_grad[1:]
        # Σ_t [dz_u, dz_r, dp] c(t-1)ᵀ
        dW_recurrent = summed_over_time(dr_factor, c_factor[:-1], ctx.route) if needs[2] else None
        db_cc = dr[..., 2 * H:].sum((0, 1)) if needs[5] else None          # Σ_t Σ_batch dp
        dr[..., 2 * H:] = dz_c                                             # the input side's dZ: [dz_u, dz_r, dz_c]
        if dr_low is not None:
            dr_low[..., 2 * H:] = dz_c                                     # rounded as torch rounds
        del dz_c  # now in dr: freed too
        dx, dW_input, db = input_gradients(needs[:1] + needs[3:5], dr, x, W_input, ctx.route, dr_low)
        return dx, dc, dW_recurrent, dW_input, db, db_cc


def _gru_after_forward_loop(gates: Tensor, c: Tensor, p: Tensor, product: FixedProduct, b_cc: Tensor) -> None:
    """t = 1 .. T of PyTorch's GRU forward, in place: `gates` (T, B, 3H) arrives holding W_x x(t) + b and
    leaves holding [Γ_u, Γ_r, c̃]; c[t] (T+1, B, H) and p[t-1] = p(t) (T, B, H) are filled."""
    H = c.size(-1)
    gamma, gamma_u, gamma_r, c_tilde, c_, p_ = per_step(gates[..., :2 * H], *gates.split(H, -1), c, p)
    recurrent_bias = torch.cat([b_cc.new_zeros(2 * H), b_cc])
    for t in range(1, c.size(0)):
        r = product(c_[t - 1], recurrent_bias)                             # W_rec c(t-1) + [0, 0, b_cc] = [., ., p(t)]
        p_[t - 1].copy_(r[:, 2 * H:])
        gamma[t - 1].add_(r[:, :2 * H]).sigmoid_()                         # Γ_u, Γ_r
        c_tilde[t - 1].addcmul_(gamma_r[t - 1], p_[t - 1]).tanh_()         # c̃ = tanh(W_cx x(t) + b_c + Γ_r * p)
        torch.lerp(c_[t - 1], c_tilde[t - 1], gamma_u[t - 1], out=c_[t])   # c(t) = Γ_u c̃ + (1 - Γ_u) c(t-1)


def _gru_after_backward_loop(gates: Tensor, c: Tensor, p: Tensor, dA: Tensor,
                             recurrent_t: FixedProduct) -> tuple[Tensor, Tensor, Tensor]:
    """t = T .. 1 of PyTorch's GRU backward from the forward's `gates` [Γ_u, Γ_r, c̃], c and p; dA[t] is
    what reaches c(t) from outside the recurrence. Returns dr (T, B, 3H) = [dz_u, dz_r, dp], the gradients
    of the recurrent products W_rec c(t-1) + [0, 0, b_cc], dz_c (T, B, H), and dc(0)."""
    T, H = gates.size(0), c.size(-1)
    c_prev, gamma_u, gamma_r, c_tilde = c[:-1], *gates.split(H, dim=2)
    # dr and dz_c start as what multiplies the incoming gradient, for all t at once; the loop multiplies it in.
    dr = sigmoid_slopes(gates)
    dr[..., :H] *= c_tilde - c_prev                                        # dz_u = dc (c̃ - c(t-1)) Γ_u (1 - Γ_u)
    dr[..., H:2 * H] *= p                                                  # dz_r = dz_c p Γ_r (1 - Γ_r)
    dr[..., 2 * H:] = gamma_r                                              # dp = dz_c Γ_r, p = W_cc c(t-1) + b_cc
    dz_c = gamma_u * tanh_slopes(c_tilde)                                  # dz_c = dc Γ_u (1 - c̃²)
    dr_, dz_u, dz_rp, dz_c_, keep, dA_ = per_step(
        dr, dr[..., :H], dr[..., H:].unflatten(-1, (2, H)), dz_c, 1 - gamma_u, dA)
    dc = dA_[T]
    for t in range(T, 0, -1):
        dz_c_[t - 1].mul_(dc)                                              # dz_c = dc Γ_u (1 - c̃²)
        dz_rp[t - 1].mul_(dz_c_[t - 1].unsqueeze(1))                       # [dz_r, dp] = dz_c [p Γ_r (1 - Γ_r), Γ_r]
        dz_u[t - 1].mul_(dc)                                               # dz_u = dc (c̃ - c(t-1)) Γ_u (1 - Γ_u)
        dc_prev = torch.addcmul(dA_[t - 1], dc, keep[t - 1])               # c(t) = ... + (1 - Γ_u) c(t-1)
        dc = recurrent_t(dr_[t - 1], dc_prev)                              # W_uᵀ dz_u + W_rᵀ dz_r + W_ccᵀ dp
    return dr, dz_c, dc
