"""Backpropagation through time written by hand, from the lecture's Backpropagation slide.

For the tanh RNN, `a(t) = tanh(W_ax x(t) + W_aa a(t-1) + b)`, the slide gives

    ∂tanh(z)/∂z = 1 - tanh(z)²
    ∂a(t)/∂W_ax = (1 - a(t)²) x(t)ᵀ        ∂a(t)/∂W_aa = (1 - a(t)²) a(t-1)ᵀ
    ∂a(t)/∂b    = Σ_batch (1 - a(t)²)      ∂a(t)/∂x(t) = W_axᵀ (1 - a(t)²)
    ∂a(t)/∂a(t-1) = W_aaᵀ (1 - a(t)²)

and the GRU and LSTM follow in the same style (docs/backprop.md derives them). One
`torch.autograd.Function` per cell kind runs the whole sequence: its forward keeps what the
backward needs (states and gate activations of every step, in preallocated (T, B, ...) buffers),
its backward walks t = T .. 1 computing only the recurrence (the gradient reaching a(t-1), c(t-1)
and the gates' pre-activation gradients dz(t)), and after the loop sums every weight gradient over
time as ONE matrix product: dW_input = dZᵀ X, dW_recurrent = dZᵀ A_prev, db = Σ dZ, dx = dZ W_input.

Inside the Functions everything is time-major: a[t] = a(t) for t = 0 .. T in a (T+1, B, H) buffer,
per-step buffers (gates, dz) (T, B, ...) indexed t-1 for step t. Rows are "(t, batch)" pairs, so a
(T, B, K) buffer seen as (T*B, K) is X, dZ or A_prev of the formulas. Rows are batch, as in
`cells.py`, so the slide's column-vector `W dz` is `dz @ W` here.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Function

from lmtrain.cells import Cell, GRUCell, LSTMCell, RNNCell
from lmtrain.gemm import PACK_FROM, FixedProduct, keeps_precision, linear, mm, product_dtype
from lmtrain.kernels import compiled


def _rows(x: Tensor) -> Tensor:
    """(B, T, E) batch-first -> (T*B, E) time-major rows (a view when x came time-major)."""
    return x.transpose(0, 1).flatten(0, 1)


def _project(x: Tensor, W_input: Tensor, b: Tensor) -> Tensor:
    """`W_x x(t) + b` of every gate for all T steps in one product, time-major (T, B, G*H): the loop
    then adds only the recurrent half, `W_a a(t-1)`."""
    return linear(_rows(x), W_input, b).unflatten(0, (x.size(1), x.size(0)))


def _states(initial: Tensor, T: int) -> Tensor:
    """A (T+1, B, H) buffer whose [t] will hold a(t) (or c(t)); [0] is the initial state."""
    states = initial.new_empty(T + 1, *initial.shape)
    states[0] = initial
    return states


def _per_step(*buffers: Tensor) -> list[tuple[Tensor, ...]]:
    """Each (T, ...) buffer as its T step views, made once: indexing inside a loop costs as much as
    the small operations themselves."""
    return [buffer.unbind(0) for buffer in buffers]


def _outputs(a: Tensor) -> tuple[Tensor, Tensor]:
    """The Function's outputs: a(1..T) (B, T, H) and the final a(T), copies rather than views of the
    buffer, laid out like the autograd layer's: `dropout` then draws the same mask for both, and the
    caller may change them in place."""
    return a[1:].transpose(0, 1).contiguous(), a[-1].clone()


def _incoming(grad_outputs: Tensor | None, grad_final: Tensor | None, a: Tensor) -> Tensor:
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


def _sigmoid_slopes(gates: Tensor) -> Tensor:
    """σ'(z) = Γ (1 - Γ) = Γ - Γ² for every saved activation Γ = σ(z), all steps at once."""
    return torch.addcmul(gates, gates, gates, value=-1)


def _tanh_slopes(activations: Tensor) -> Tensor:
    """∂tanh(z)/∂z = 1 - tanh(z)², from the saved tanh(z), all steps at once."""
    return torch.addcmul(activations.new_ones(()), activations, activations, value=-1)


def _over_time(dz: Tensor, inputs: Tensor) -> Tensor:
    """Σ_t Σ_batch dz(t) input(t)ᵀ as one product: (T, B, K), (T, B, H) -> (K, H)."""
    return mm(dz.flatten(0, 1).t(), inputs.flatten(0, 1))


def _input_gradients(needs: tuple[bool, ...], dz: Tensor, x: Tensor, W_input: Tensor,
                     dz_factor: Tensor | None = None):
    """dx(t) = W_inputᵀ dz(t), dW_input = Σ_t dz(t) x(t)ᵀ, db = Σ_t Σ_batch dz(t): one product each
    over all T*B rows. `needs` says which of (x, W_input, b) want a gradient; `dz_factor`, dz as the
    products' factor (a bfloat16 copy already made), is dz itself if not given."""
    dz_rows = dz.flatten(0, 1)                                             # (T*B, G*H)
    factor_rows = dz_rows if dz_factor is None else dz_factor.flatten(0, 1)
    dx = linear(factor_rows, W_input.t()).unflatten(0, dz.shape[:2]).transpose(0, 1) if needs[0] else None
    dW_input = mm(factor_rows.t(), _rows(x)) if needs[1] else None
    db = dz_rows.sum(0) if needs[2] else None
    return dx, dW_input, db


@keeps_precision
class RNNFunction(Function):
    """The tanh RNN over a whole sequence. Inputs: x (B, T, E), a(0) (B, H), W_aa (H, H), W_ax (H, E),
    b (H,). Outputs: a(1..T) (B, T, H) and a(T) (B, H)."""

    @staticmethod
    def forward(ctx, x, a0, W_aa, W_ax, b):
        ctx.set_materialize_grads(False)
        a = _states(a0, x.size(1))                                         # (T+1, B, H)
        a_, z_ = _per_step(a, _project(x, W_ax, b))                        # z_[t-1] = W_ax x(t) + b
        recurrent = FixedProduct(W_aa, x.size(0), x.size(1))
        for t in range(1, a.size(0)):
            torch.tanh(recurrent(a_[t - 1], z_[t - 1]), out=a_[t])         # a(t) = tanh(W_ax x(t) + W_aa a(t-1) + b)
        ctx.save_for_backward(x, a, W_aa, W_ax)
        return _outputs(a)

    @staticmethod
    def backward(ctx, grad_outputs, grad_final):
        x, a, W_aa, W_ax = ctx.saved_tensors
        T, needs = a.size(0) - 1, ctx.needs_input_grad
        dz = _tanh_slopes(a[1:])                                           # (T, B, H): 1 - a(t)², times da(t) below
        dA, dz_ = _per_step(_incoming(grad_outputs, grad_final, a), dz)
        da, recurrent_t = dA[T], FixedProduct(W_aa.t().contiguous(), a.size(1), T)  # dz W_aa: the product transposed
        for t in range(T, 0, -1):
            dz_[t - 1].mul_(da)                                            # dz = da * (1 - a(t)²)
            da = recurrent_t(dz_[t - 1], dA[t - 1])                        # ∂a(t)/∂a(t-1) = W_aaᵀ (1 - a(t)²)
        dW_aa = _over_time(dz, a[:-1]) if needs[2] else None               # ∂a(t)/∂W_aa = (1 - a(t)²) a(t-1)ᵀ
        dx, dW_ax, db = _input_gradients(needs[:1] + needs[3:], dz, x, W_ax)  # ∂a(t)/∂x(t), /∂W_ax, /∂b
        return dx, da, dW_aa, dW_ax, db


@keeps_precision
class GRUFunction(Function):
    """The lecture's GRU, Γ_r applied to c(t-1) before the product (`reset="before"`), with or without
    the relevance gate. Inputs: x, c(0), W_recurrent (G*H, H), W_input (G*H, E), b (G*H,), and
    relevance_gate (a bool: gates (u, r, c) or (u, c)). Outputs: c(1..T) (B, T, H) and c(T)."""

    @staticmethod
    def forward(ctx, x, c0, W_recurrent, W_input, b, relevance_gate):
        ctx.set_materialize_grads(False)
        H, c = c0.size(1), _states(c0, x.size(1))                          # c: (T+1, B, H)
        gates = _project(x, W_input, b)                                    # (T, B, G*H)
        gamma, gamma_u, gamma_r, c_tilde, c_ = _per_step(                  # gates: [Γ_u, (Γ_r,) c̃] of each step
            gates[..., :-H], gates[..., :H], gates[..., H:2 * H], gates[..., -H:], c)
        B, T = x.shape[:2]                                                 # recurrent halves: (W_u, W_r), W_c
        W_gates, W_c = FixedProduct(W_recurrent[:-H], B, T), FixedProduct(W_recurrent[-H:], B, T)
        for t in range(1, T + 1):
            torch.sigmoid(W_gates(c_[t - 1], gamma[t - 1]), out=gamma[t - 1])  # Γ_u, Γ_r = σ(W [c(t-1), x(t)] + b)
            c_in = gamma_r[t - 1] * c_[t - 1] if relevance_gate else c_[t - 1]  # Γ_r * c(t-1)
            torch.tanh(W_c(c_in, c_tilde[t - 1]), out=c_tilde[t - 1])      # c̃ = tanh(W_c [Γ_r * c(t-1), x(t)] + b_c)
            torch.lerp(c_[t - 1], c_tilde[t - 1], gamma_u[t - 1], out=c_[t])  # c(t) = Γ_u c̃ + (1 - Γ_u) c(t-1)
        ctx.relevance_gate = relevance_gate
        ctx.save_for_backward(x, c, gates, W_recurrent, W_input)
        return _outputs(c)

    @staticmethod
    def backward(ctx, grad_outputs, grad_final):
        x, c, gates, W_recurrent, W_input = ctx.saved_tensors
        H, relevance_gate, needs = c.size(-1), ctx.relevance_gate, ctx.needs_input_grad
        c_prev, gamma_u, c_tilde = c[:-1], gates[..., :H], gates[..., -H:]
        # dz (T, B, G*H) starts as what multiplies the incoming gradient, for all t at once; the loop
        # multiplies that gradient in.
        dz = _sigmoid_slopes(gates)                                        # Γ (1 - Γ)
        dz[..., :H] *= c_tilde - c_prev                                    # dz_u = dc (c̃ - c(t-1)) Γ_u (1 - Γ_u)
        if relevance_gate:
            dz[..., H:2 * H] *= c_prev                                     # dz_r = dc_in c(t-1) Γ_r (1 - Γ_r)
        torch.mul(gamma_u, _tanh_slopes(c_tilde), out=dz[..., -H:])       # dz_c = dc Γ_u (1 - c̃²)
        loop = _gru_relevance_loop if relevance_gate else _gru_simplified_loop
        dc = loop(dz, _incoming(grad_outputs, grad_final, c), 1 - gamma_u, gates, W_recurrent)
        dW_recurrent = None
        if needs[2]:  # the gates read c(t-1), the candidate reads Γ_r * c(t-1)
            c_in = gates[..., H:2 * H] * c_prev if relevance_gate else c_prev
            dW_recurrent = torch.cat([_over_time(dz[..., :-H], c_prev), _over_time(dz[..., -H:], c_in)])
        dx, dW_input, db = _input_gradients(needs[:1] + needs[3:5], dz, x, W_input)
        return dx, dc, dW_recurrent, dW_input, db, None


def _gru_relevance_loop(dz, dC, keep, gates, W_recurrent):
    """t = T .. 1 for the full GRU (gates u, r, c): multiplies the incoming gradients into dz(t),
    returns dc(0)."""
    T, H = dC.size(0) - 1, dC.size(2)
    rows = dC.size(1)                                                      # products with the transposed recurrent halves
    gates_t, candidate_t = (FixedProduct(W_recurrent[:-H].t().contiguous(), rows, T),
                            FixedProduct(W_recurrent[-H:].t().contiguous(), rows, T))
    dz_gates, dz_u, dz_r, dz_c, gamma_r, keep, dC = _per_step(
        dz[..., :2 * H], *dz.split(H, -1), gates[..., H:2 * H], keep, dC)
    dc = dC[T]
    for t in range(T, 0, -1):
        dz_c[t - 1].mul_(dc)                                               # dz_c = dc Γ_u (1 - c̃²)
        dc_in = candidate_t(dz_c[t - 1])                                   # reaches the candidate's input Γ_r * c(t-1)
        dz_r[t - 1].mul_(dc_in)                                            # dz_r = dc_in c(t-1) Γ_r (1 - Γ_r)
        dz_u[t - 1].mul_(dc)                                               # dz_u = dc (c̃ - c(t-1)) Γ_u (1 - Γ_u)
        dc_prev = torch.addcmul(dC[t - 1], dc, keep[t - 1])               # c(t) = ... + (1 - Γ_u) c(t-1)
        dc_prev.addcmul_(dc_in, gamma_r[t - 1])                            # c̃ reads Γ_r * c(t-1)
        dc = gates_t(dz_gates[t - 1], dc_prev)                             # Γ_u, Γ_r read c(t-1)
    return dc


def _gru_simplified_loop(dz, dC, keep, gates, W_recurrent):
    """t = T .. 1 for the simplified GRU (gates u, c): multiplies dc(t) into dz(t), returns dc(0)."""
    T, H = dC.size(0) - 1, dC.size(2)
    dz_, dz_uc, keep, dC = _per_step(dz, dz.unflatten(-1, (2, H)), keep, dC)
    dc = dC[T]
    recurrent_t = FixedProduct(W_recurrent.t().contiguous(), dc.size(0), T)
    for t in range(T, 0, -1):
        # [dz_u, dz_c] = dc [(c̃ - c(t-1)) Γ_u (1 - Γ_u), Γ_u (1 - c̃²)], both blocks in one product
        dz_uc[t - 1].mul_(dc.unsqueeze(1))
        dc_prev = torch.addcmul(dC[t - 1], dc, keep[t - 1])               # c(t) = ... + (1 - Γ_u) c(t-1)
        dc = recurrent_t(dz_[t - 1], dc_prev)                              # both gates read c(t-1)
    return dc


@keeps_precision
class GRUAfterFunction(Function):
    """PyTorch's GRU (`reset="after"`): c̃ = tanh(W_cx x(t) + b_c + Γ_r * p(t)), p(t) = W_cc c(t-1) + b_cc.
    Inputs: x, c(0), W_recurrent (3H, H), W_input (3H, E), b (3H,), b_cc (H,). Outputs as GRUFunction."""

    @staticmethod
    def forward(ctx, x, c0, W_recurrent, W_input, b, b_cc):
        ctx.set_materialize_grads(False)
        H, c = c0.size(1), _states(c0, x.size(1))                          # c: (T+1, B, H)
        gates = _project(x, W_input, b)                                    # (T, B, 3H)
        gamma, gamma_u, gamma_r, c_tilde, c_ = _per_step(gates[..., :2 * H], *gates.split(H, -1), c)
        recurrent_bias = torch.cat([b_cc.new_zeros(2 * H), b_cc])
        product = FixedProduct(W_recurrent, *x.shape[:2])
        recurrent = []                                                     # [t-1]: W_rec c(t-1) + [0, 0, b_cc] = [., ., p(t)]
        for t in range(1, c.size(0)):
            recurrent.append(r := product(c_[t - 1], recurrent_bias))
            gamma[t - 1].add_(r[:, :2 * H]).sigmoid_()                    # Γ_u, Γ_r
            c_tilde[t - 1].addcmul_(gamma_r[t - 1], r[:, 2 * H:]).tanh_()  # c̃ = tanh(W_cx x(t) + b_c + Γ_r * p)
            torch.lerp(c_[t - 1], c_tilde[t - 1], gamma_u[t - 1], out=c_[t])  # c(t) = Γ_u c̃ + (1 - Γ_u) c(t-1)
        recurrent = torch.stack(recurrent) if recurrent else torch.empty_like(gates)  # (T, B, 3H)
        ctx.save_for_backward(x, c, gates, recurrent, W_recurrent, W_input)
        return _outputs(c)

    @staticmethod
    def backward(ctx, grad_outputs, grad_final):
        x, c, gates, recurrent, W_recurrent, W_input = ctx.saved_tensors
        T, H = gates.size(0), c.size(-1)
        c_prev, gamma_u, gamma_r, c_tilde = c[:-1], *gates.split(H, dim=2)
        # dr = [dz_u, dz_r, dp], the gradients of the recurrent products W_rec c(t-1) + [0, 0, b_cc], and
        # dz_c start as what multiplies the incoming gradient, for all t at once; the loop multiplies it in.
        dr = _sigmoid_slopes(gates)
        dr[..., :H] *= c_tilde - c_prev                                    # dz_u = dc (c̃ - c(t-1)) Γ_u (1 - Γ_u)
        dr[..., H:2 * H] *= recurrent[..., 2 * H:]                         # dz_r = dz_c p Γ_r (1 - Γ_r)
        dr[..., 2 * H:] = gamma_r                                          # dp = dz_c Γ_r, p = W_cc c(t-1) + b_cc
        dz_c = gamma_u * _tanh_slopes(c_tilde)                             # dz_c = dc Γ_u (1 - c̃²)
        dr_, dz_u, dz_rp, dz_c_, keep, dC = _per_step(
            dr, dr[..., :H], dr[..., H:].unflatten(-1, (2, H)), dz_c, 1 - gamma_u,
            _incoming(grad_outputs, grad_final, c))
        dc = dC[T]
        recurrent_t = FixedProduct(W_recurrent.t().contiguous(), dc.size(0), T)
        for t in range(T, 0, -1):
            dz_c_[t - 1].mul_(dc)                                          # dz_c = dc Γ_u (1 - c̃²)
            dz_rp[t - 1].mul_(dz_c_[t - 1].unsqueeze(1))                   # [dz_r, dp] = dz_c [p Γ_r (1 - Γ_r), Γ_r]
            dz_u[t - 1].mul_(dc)                                           # dz_u = dc (c̃ - c(t-1)) Γ_u (1 - Γ_u)
            dc_prev = torch.addcmul(dC[t - 1], dc, keep[t - 1])           # c(t) = ... + (1 - Γ_u) c(t-1)
            dc = recurrent_t(dr_[t - 1], dc_prev)                          # W_uᵀ dz_u + W_rᵀ dz_r + W_ccᵀ dp
        needs = ctx.needs_input_grad
        dW_recurrent = _over_time(dr, c_prev) if needs[2] else None        # Σ_t [dz_u, dz_r, dp] c(t-1)ᵀ
        db_cc = dr[..., 2 * H:].sum((0, 1)) if needs[5] else None          # Σ_t Σ_batch dp
        dr[..., 2 * H:] = dz_c                                             # the input side's dZ: [dz_u, dz_r, dz_c]
        dx, dW_input, db = _input_gradients(needs[:1] + needs[3:5], dr, x, W_input)
        return dx, dc, dW_recurrent, dW_input, db, db_cc


@keeps_precision
class LSTMFunction(Function):
    """The LSTM over a whole sequence. Inputs: x, a(0), c(0), W_recurrent (4H, H), W_input (4H, E),
    b (4H,), gates (f, u, c, o). Outputs: a(1..T) (B, T, H), a(T) and c(T). The time loops are the
    compiled ones (`lmtrain.kernels`) where they can run and the sequence has at least PACK_FROM steps:
    they pack W_recurrent first, which a single step (sampling feeds one token at a time) would not
    repay."""

    @staticmethod
    def forward(ctx, x, a0, c0, W_recurrent, W_input, b):
        ctx.set_materialize_grads(False)
        T = x.size(1)
        a, c = _states(a0, T), _states(c0, T)                              # (T+1, B, H)
        gates = _project(x, W_input, b)                                    # (T, B, 4H)
        tanh_c = torch.empty_like(c[1:])                                   # tanh(c(t))
        a_low = None                                                       # bfloat16 copies of a(t), for bfloat16 products
        if (loops := _compiled_loops(x, T, a0.size(1))) is not None:       # _lstm_forward_loop, compiled
            a_low = torch.empty_like(a, dtype=torch.bfloat16) if product_dtype() is not None else None
            loops.lstm_forward(gates, a, c, tanh_c, W_recurrent.detach().contiguous(), a_low)
        else:
            _lstm_forward_loop(gates, a, c, tanh_c, FixedProduct(W_recurrent, x.size(0), T))
        ctx.save_for_backward(x, a, c, gates, tanh_c, W_recurrent, W_input, a_low)
        return (*_outputs(a), c[-1].clone())

    @staticmethod
    def backward(ctx, grad_outputs, grad_a_final, grad_c_final):
        x, a, c, gates, tanh_c, W_recurrent, W_input, a_low = ctx.saved_tensors
        T = tanh_c.size(0)
        dA = _incoming(grad_outputs, grad_a_final, a)
        dc = grad_c_final if grad_c_final is not None else torch.zeros_like(dA[T])
        dz_low = None                                                      # bfloat16 copies of dz(t), for bfloat16 products
        if (loops := _compiled_loops(gates, T, c.size(2))) is not None:    # _lstm_backward_loop, compiled
            dz_low = torch.empty_like(gates, dtype=torch.bfloat16) if product_dtype() is not None else None
            dz, da, dc = loops.lstm_backward(gates, c, tanh_c, dA, dc, W_recurrent.detach().contiguous(), dz_low)
        else:
            recurrent_t = FixedProduct(W_recurrent.t().contiguous(), dc.size(0), T)  # dz W_a: the product transposed
            dz, da, dc = _lstm_backward_loop(gates, c, tanh_c, dA, dc, recurrent_t)
        needs = ctx.needs_input_grad
        # The products below read the bfloat16 copies the loops made, where both loops made them (a forward
        # and its backward may run different loops: `kernels.use_compiled` may change between the two).
        dz_factor, a_factor = (dz, a) if dz_low is None or a_low is None else (dz_low, a_low)
        dW_recurrent = _over_time(dz_factor, a_factor[:-1]) if needs[3] else None  # Σ_t dz(t) a(t-1)ᵀ
        dx, dW_input, db = _input_gradients(needs[:1] + needs[4:], dz, x, W_input, dz_factor)
        return dx, da, dc, dW_recurrent, dW_input, db


def _lstm_forward_loop(gates: Tensor, a: Tensor, c: Tensor, tanh_c: Tensor, recurrent: FixedProduct) -> None:
    """t = 1 .. T of the LSTM forward, in place: `gates` (T, B, 4H) arrives holding W_x x(t) + b and
    leaves holding [Γ_f, Γ_u, c̃, Γ_o]; a[t], c[t] (T+1, B, H) and tanh_c[t-1] = tanh(c(t)) are filled."""
    H = a.size(2)
    z, gamma_fu, gamma_f, gamma_u, c_tilde, gamma_o, a_, c_, tanh_c_ = _per_step(
        gates, gates[..., :2 * H], *gates.split(H, -1), a, c, tanh_c)      # gates: [Γ_f, Γ_u, c̃, Γ_o] of each step
    for t in range(1, a.size(0)):
        z_t = recurrent(a_[t - 1], z[t - 1])                                # z = W [a(t-1), x(t)] + b
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
    dz = _sigmoid_slopes(gates)                                            # Γ (1 - Γ)
    dz[..., :H] *= c[:-1]                                                  # dz_f = dc c(t-1) Γ_f (1 - Γ_f)
    dz[..., H:2 * H] *= c_tilde                                            # dz_u = dc c̃ Γ_u (1 - Γ_u)
    torch.mul(gamma_u, _tanh_slopes(c_tilde), out=dz[..., 2 * H:3 * H])   # dz_c = dc Γ_u (1 - c̃²)
    dz[..., 3 * H:] *= tanh_c                                              # dz_o = da tanh(c(t)) Γ_o (1 - Γ_o)
    through_a = _tanh_slopes(tanh_c).mul_(gamma_o)                         # ∂a(t)/∂c(t) = Γ_o (1 - tanh²(c(t)))
    dz_, dz_fuc, dz_o, through_a_, forget, dA_ = _per_step(
        dz, dz[..., :3 * H].unflatten(-1, (3, H)), dz[..., 3 * H:], through_a, gamma_f, dA)
    da = dA_[T]
    for t in range(T, 0, -1):
        dc = torch.addcmul(dc, da, through_a_[t - 1])                      # dc(t) += da(t) ∂a(t)/∂c(t)
        dz_fuc[t - 1].mul_(dc.unsqueeze(1))                                # dz_f, dz_u, dz_c
        dz_o[t - 1].mul_(da)                                               # dz_o
        dc = dc * forget[t - 1]                                            # ∂c(t)/∂c(t-1) = Γ_f
        da = recurrent_t(dz_[t - 1], dA_[t - 1])                           # ∂z(t)/∂a(t-1) = W_aᵀ (recurrent half)
    return dz, da, dc


def _compiled_loops(tensor: Tensor, T: int, H: int):
    """The compiled LSTM loops, if they run this sequence: T >= PACK_FROM steps (they pack W first, which
    a single step, as when sampling, would not repay), float32 on the CPU, and, with bfloat16 products,
    an even H on a CPU with AVX-512 BF16 (`lstm_forward`'s a_low). None: the Python loops."""
    if T < PACK_FROM or (loops := compiled(tensor)) is None:
        return None
    if product_dtype() is not None and not (H % 2 == 0 and loops.bf16_products_supported()):
        return None
    return loops


def function_for(cell: Cell) -> tuple[type[Function], tuple]:
    """The Function that runs `cell` over a sequence, and its arguments after (x, *state, W_recurrent,
    W_input, b)."""
    if isinstance(cell, LSTMCell):
        return LSTMFunction, ()
    if isinstance(cell, GRUCell):
        return (GRUAfterFunction, (cell.b_cc,)) if cell.reset == "after" else (GRUFunction, (cell.relevance_gate,))
    if isinstance(cell, RNNCell):
        return RNNFunction, ()
    raise TypeError(f"no hand-written backward for {type(cell).__name__}")


def manual_layer(cell: Cell, x: Tensor, state: tuple[Tensor, ...], *, reverse: bool = False,
                 weights: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
    """`cell` over x (B, T, E) from `state`: outputs a(1..T) (B, T, H) and the final state, the same
    values as the autograd layer, with the hand-written backward. `reverse` runs right to left.
    `weights`: (W_recurrent, W_input, b) to use instead of `cell.stacked_weights()` (e.g. after DropConnect;
    their gradients flow back through autograd to the cell's parameters)."""
    function, extra = function_for(cell)
    W_recurrent, W_input, b = weights if weights is not None else cell.stacked_weights()
    if reverse:
        x = x.flip(1)
    outputs, *final = function.apply(x, *state, W_recurrent, W_input, b, *extra)
    if reverse:
        outputs = outputs.flip(1)
    return outputs, cell.state_type(*final)
