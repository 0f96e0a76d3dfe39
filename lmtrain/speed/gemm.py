"""The matrix products of the recurrences, run by the fastest GEMM at hand: oneDNN's where the route
says so (float32 except on an x86 CPU with AVX2 and no AVX-512; bfloat16 where oneDNN has bfloat16
products; lmtrain/speed/route.py), ATen's `addmm` (MKL, OpenBLAS, cuBLAS) otherwise.

Why not always `torch.addmm`: on CPU it calls MKL, which runs a recurrence's small per-step products,
(B, H) @ (H, 4H) with B = 32, well below what oneDNN reaches with its weight packed once for the
whole sequence (docs/benchmarks.md; `nn.LSTM` gets its speed from the same oneDNN). oneDNN follows
torch's own switch: `torch.backends.mkldnn.enabled = False` (or `use_onednn(False)` below) makes
every product here an `addmm`. Both compute the same float32 sums; they differ only in summation
order (about 1e-6 relative; tests/test_gemm.py compares them).

Mixed precision (`train.precision: bfloat16`: a route whose `product_dtype` is bfloat16, chosen under
`torch.autocast`, lmtrain/speed/route.py): every product here then takes bfloat16 factors, rounded
from the float32 weights and activations, and the library sums them in float32 (oneDNN's bfloat16
GEMM: a multiple of float32's throughput on a CPU with AVX-512 BF16, docs/benchmarks.md); its result is
rounded to bfloat16 and handed back as float32, as torch.autocast's own products are. Weights, states,
gate arithmetic, the loss and the optimizer stay float32 (Micikevicius et al. 2018, "Mixed Precision
Training"; Kalamkar et al. 2019 on bfloat16, which needs no loss scaling).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.autograd import Function

from lmtrain.speed.route import PACK_FROM, Route, choose, runs_on_its_route
from lmtrain.speed.torch_internals import ONEDNN_LINEAR

_ONEDNN = ONEDNN_LINEAR  # None: every product here is then torch's addmm


def mm(a: Tensor, b: Tensor, route: Route, out: Tensor | None = None) -> Tensor:
    """a @ b, of factors in the route's product dtype (float32 result: mixed precision is for float32
    models) or in their own: the weight gradients dZᵀ X, by torch.mm (oneDNN's linear would need both
    factors transposed into copies there). Written into `out` (contiguous) if given."""
    if route.mixed:
        low = torch.mm(route.lowered(a), route.lowered(b))
        return low.to(torch.float32) if out is None else out.copy_(low)
    return torch.mm(a, b, out=out)


@contextmanager
def use_onednn(enabled: bool) -> Iterator[None]:
    """Switch oneDNN on or off inside the block: `torch.backends.mkldnn.flags(enabled=...)` without
    the TF32 warning that torch 2.13's `flags` prints on every entry. Routes chosen inside it follow."""
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


# Below this many weights (H = 128 for every cell), MKL's addmm is the faster of the two per step
# (docs/benchmarks.md, "oneDNN or MKL").
ONEDNN_FROM_WEIGHTS = 1 << 17


class FixedProduct:
    """`add + x Wᵀ` for one weight W (N, K) and `uses` products with x (rows, K): the recurrent half
    of every gate, `W_a a(t-1)`, at each of T steps. oneDNN packs W into its blocked layout once,
    here, not at every step."""

    def __init__(self, W: Tensor, rows: int, uses: int, route: Route) -> None:
        self.onednn = (route.onednn and W.dtype in (torch.float32, torch.bfloat16)
                       and W.numel() >= ONEDNN_FROM_WEIGHTS)
        self.mixed = route.mixed and W.dtype == torch.float32
        self.route = route
        W = route.lowered(W.detach())
        if self.onednn:
            self.W = _ONEDNN.pack(W, rows) if uses >= PACK_FROM else W.contiguous()  # strided: see `linear`
        else:
            self.W_t = W.t()

    def __call__(self, x: Tensor, add: Tensor | None = None) -> Tensor:
        """x Wᵀ + add, a new (rows, N) tensor; `add` is None, a bias (N,) or a (rows, N) tensor (which
        may be a strided view)."""
        if self.mixed:  # the product in bfloat16, the sum with `add` in float32
            x_low = self.route.lowered(x)
            low = _ONEDNN(x_low, self.W) if self.onednn else x_low @ self.W_t
            return low.to(x.dtype) if add is None else torch.add(add, low)
        if self.onednn:
            if add is None or add.dim() == 1:
                return _ONEDNN(x, self.W, add)
            return _ONEDNN.plus(x, self.W, add)
        return x @ self.W_t if add is None else torch.addmm(add, x, self.W_t)


def linear(x: Tensor, W: Tensor, b: Tensor | None, route: Route) -> Tensor:
    """x Wᵀ + b for x (rows, K), W (N, K): one product over all T*B rows at once (the input half of
    every gate; the gradient reaching the inputs where `times_weight` sends it). Weight gradients, dZᵀ X,
    are `mm`'s."""
    if route.mixed:  # the model's own dtype is float32
        low = torch.mm(route.lowered(x), route.lowered(W.detach()).t())
        return low.to(torch.float32) if b is None else torch.add(b.detach(), low)
    if route.onednn and x.dtype in (torch.float32, torch.bfloat16):
        # A strided weight (W_inputᵀ for the input gradient) sends oneDNN to a reference path, slower by
        # orders of magnitude: a contiguous copy of the weight costs next to nothing.
        return _ONEDNN(x, W.detach().contiguous(), None if b is None else b.detach())
    return x @ W.t() if b is None else torch.addmm(b, x, W.t())


def times_weight(x: Tensor, W: Tensor, route: Route) -> Tensor:
    """x W for x (rows, N), W (N, K) as stored: the gradient reaching the inputs, dx(t) = W_xᵀ dz(t)
    for every step at once. oneDNN's linear takes Wᵀ, which must be a contiguous copy of the weight (see
    `linear`); the copy pays for itself only when the rows are at least as many as the weight's, so
    fewer rows (batch 1, short sequences) go to torch.mm: faster there, and no copy of the weight at
    the backward's peak (docs/benchmarks.md, "The input gradient's product")."""
    if times_weight_by_onednn(x.size(0), W.size(0), route):
        return linear(x, W.t(), None, route)
    return mm(x, W.detach(), route)


def times_weight_by_onednn(rows: int, weight_rows: int, route: Route) -> bool:
    """Whether `times_weight` gives x (rows, N) times W (weight_rows = N, K) to oneDNN's linear."""
    return route.onednn and not route.mixed and rows >= weight_rows


@runs_on_its_route
class ProjectionFunction(Function):
    """x Wᵀ + b over the last axis of x (..., K), W (N, K): the language model's output layer, whose
    forward at PTB's 10k words is one of a step's largest products. The forward goes to `linear` (oneDNN,
    faster than MKL's addmm there: scripts/bench_train_step.py); the backward is the usual one,
    dx = grad W, dW = gradᵀ x, db = Σ grad, as `torch.mm`s (oneDNN would need Wᵀ copied first)."""

    @staticmethod
    def forward(ctx, route: Route, x: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, W)
        ctx.has_bias = b is not None
        return linear(x.reshape(-1, x.size(-1)), W, b, route).view(*x.shape[:-1], W.size(0))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, W = ctx.saved_tensors
        rows = grad.reshape(-1, grad.size(-1))                              # (rows, N)
        needs = ctx.needs_input_grad[1:]
        dx = mm(rows, W, ctx.route).view_as(x) if needs[0] else None
        dW = mm(rows.t(), x.reshape(-1, x.size(-1)), ctx.route) if needs[1] else None
        db = rows.sum(0) if ctx.has_bias and needs[2] else None
        return dx, dW, db


def projection(x: Tensor, W: Tensor, b: Tensor | None = None) -> Tensor:
    """`ProjectionFunction` on the route chosen for x: x Wᵀ + b for x (..., K), W (N, K), b (N,) or None."""
    return ProjectionFunction.apply(choose(x, compiled=False), x, W, b)
