"""The matrix products of the recurrences, run by the fastest GEMM at hand: oneDNN's where it runs
(CPU, float32 or bfloat16), ATen's `addmm` (MKL, OpenBLAS, cuBLAS) otherwise.

Why not always `torch.addmm`: on CPU it calls MKL, which runs a recurrence's small per-step products,
(B, H) @ (H, 4H) with B = 32, at about 0.6x of what oneDNN reaches with its weight packed once for the
whole sequence (docs/benchmarks.md; `nn.LSTM` gets its speed from the same oneDNN). oneDNN follows
torch's own switch: `torch.backends.mkldnn.enabled = False` (or `use_onednn(False)` below) makes
every product here an `addmm`. Both compute the same float32 sums; they differ only in summation
order (about 1e-6 relative; tests/test_gemm.py compares them).

Mixed precision (`train.precision: bfloat16`, `products_in` below): inside the block every product
here takes bfloat16 factors, rounded from the float32 weights and activations, and the library sums
them in float32 (oneDNN's bfloat16 GEMM: about 2.5x float32's throughput on a CPU with AVX-512 BF16,
docs/benchmarks.md); its result is rounded to bfloat16 and handed back as float32, as under
`torch.autocast`. Weights, states, gate arithmetic, the loss and the optimizer stay float32 (Micikevicius
et al. 2018, "Mixed Precision Training"; Kalamkar et al. 2019 on bfloat16, which needs no loss scaling).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.autograd import Function


from lmtrain.torch_internals import ONEDNN_LINEAR

_ONEDNN = ONEDNN_LINEAR  # (linear, reorder_weight), or None: every product here is then torch's addmm

_precision: dict[str, torch.dtype | None] = {"dtype": None}  # None: each product in its factors' dtype


@contextmanager
def products_in(dtype: torch.dtype | None) -> Iterator[None]:
    """Make the products inside the block with `dtype` factors (torch.bfloat16: mixed precision; None:
    the factors' own dtype). The Functions below remember it for their backward (`keeps_precision`)."""
    previous = _precision["dtype"]
    _precision["dtype"] = dtype
    try:
        yield
    finally:
        _precision["dtype"] = previous


def product_dtype() -> torch.dtype | None:
    """The dtype the products are made in now (None: the factors' own)."""
    return _precision["dtype"]


def lowered(tensor: Tensor) -> Tensor:
    """`tensor` as a factor of a product: rounded to the product dtype if one is set and it is float32."""
    dtype = _precision["dtype"]
    return tensor.to(dtype) if dtype is not None and tensor.dtype == torch.float32 else tensor


def mm(a: Tensor, b: Tensor) -> Tensor:
    """a @ b, of factors in the product dtype (float32 result: mixed precision is for float32 models) or
    in their own: the weight gradients dZᵀ X, by torch.mm (oneDNN's linear needs both factors
    transposed into copies there, and was slower in a side-by-side timing: 8192 rows, 34 ms against
    MKL's 24 ms)."""
    if product_dtype() is not None:  # mixed precision: the model's own dtype is float32
        return torch.mm(lowered(a), lowered(b)).to(torch.float32)
    return torch.mm(a, b)


def keeps_precision(function: type[Function]) -> type[Function]:
    """Class decorator for an autograd Function: its backward makes its products in the precision its
    forward ran in, wherever autograd calls it from."""
    forward, backward = function.forward, function.backward

    def forward_in_precision(ctx, *arguments):
        ctx.product_dtype = product_dtype()
        return forward(ctx, *arguments)

    def backward_in_precision(ctx, *gradients):
        with products_in(ctx.product_dtype):
            return backward(ctx, *gradients)

    function.forward, function.backward = staticmethod(forward_in_precision), staticmethod(backward_in_precision)
    return function


def onednn_runs(tensor: Tensor) -> bool:
    """Whether oneDNN takes products of `tensor`'s kind: CPU, float32 or bfloat16, switched on."""
    return (_ONEDNN is not None and torch.backends.mkldnn.enabled and tensor.device.type == "cpu"
            and tensor.dtype in (torch.float32, torch.bfloat16))


@contextmanager
def use_onednn(enabled: bool) -> Iterator[None]:
    """Switch oneDNN on or off inside the block: `torch.backends.mkldnn.flags(enabled=...)` without
    the TF32 warning that torch 2.13's `flags` prints on every entry."""
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


# Packing W for oneDNN costs about two products' worth of time (measured at (1024, 256)); for fewer
# uses than this, as when sampling feeds one token at a time, W is used as it is.
PACK_FROM = 4
# Below this many weights (H = 128 for every cell), MKL's addmm was the faster of the two per step: the
# layer took 0.78x nn.RNN's time with it against 1.13x with oneDNN (docs/benchmarks.md).
ONEDNN_FROM_WEIGHTS = 1 << 17


class FixedProduct:
    """`add + x Wᵀ` for one weight W (N, K) and `uses` products with x (rows, K): the recurrent half
    of every gate, `W_a a(t-1)`, at each of T steps. oneDNN packs W into its blocked layout once,
    here, not at every step."""

    def __init__(self, W: Tensor, rows: int, uses: int) -> None:
        self.onednn = onednn_runs(W) and W.numel() >= ONEDNN_FROM_WEIGHTS
        self.mixed = product_dtype() is not None and W.dtype == torch.float32
        W = lowered(W.detach())
        if self.onednn:
            self.W = _ONEDNN[1](W, rows) if uses >= PACK_FROM else W.contiguous()  # strided: see `linear`
        else:
            self.W_t = W.t()

    def __call__(self, x: Tensor, add: Tensor | None = None) -> Tensor:
        """x Wᵀ + add, a new (rows, N) tensor; `add` is None, a bias (N,) or a (rows, N) tensor (which
        may be a strided view)."""
        if self.mixed:  # the product in bfloat16, the sum with `add` in float32
            low = _ONEDNN[0](lowered(x), self.W, None, "none", [], "") if self.onednn else lowered(x) @ self.W_t
            return low.to(x.dtype) if add is None else torch.add(add, low)
        if self.onednn:
            if add is None or add.dim() == 1:
                return _ONEDNN[0](x, self.W, add, "none", [], "")
            return _ONEDNN[0].binary(x, add, self.W, None, "add")
        return x @ self.W_t if add is None else torch.addmm(add, x, self.W_t)


def linear(x: Tensor, W: Tensor, b: Tensor | None = None) -> Tensor:
    """x Wᵀ + b for x (rows, K), W (N, K): one product over all T*B rows at once (the input half of
    every gate, or the gradient reaching the inputs). Weight gradients, dZᵀ X, are `mm`'s."""
    if product_dtype() is not None:  # mixed precision: the model's own dtype is float32
        low = torch.mm(lowered(x), lowered(W.detach()).t())
        return low.to(torch.float32) if b is None else torch.add(b.detach(), low)
    if onednn_runs(x):
        # A strided weight (W_inputᵀ for the input gradient) sends oneDNN to a reference path about
        # 100x slower (measured): a contiguous copy of the weight costs next to nothing.
        return _ONEDNN[0](x, W.detach().contiguous(), None if b is None else b.detach(), "none", [], "")
    return x @ W.t() if b is None else torch.addmm(b, x, W.t())


@keeps_precision
class Projection(Function):
    """x Wᵀ + b over the last axis of x (..., K), W (N, K): the language model's output layer, whose
    forward at PTB's 10k words is one of a step's largest products. The forward goes to `linear` (oneDNN,
    faster than MKL's addmm there: a PTB step in 0.96x the time, scripts/bench_train_step.py); the backward
    is autograd's own, dx = grad W, dW = gradᵀ x, db = Σ grad, as `torch.mm`s (oneDNN would need Wᵀ
    copied first)."""

    @staticmethod
    def forward(ctx, x: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, W)
        ctx.has_bias = b is not None
        return linear(x.reshape(-1, x.size(-1)), W, b).view(*x.shape[:-1], W.size(0))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, W = ctx.saved_tensors
        rows = grad.reshape(-1, grad.size(-1))                              # (rows, N)
        needs = ctx.needs_input_grad
        dx = mm(rows, W).view_as(x) if needs[0] else None
        dW = mm(rows.t(), x.reshape(-1, x.size(-1))) if needs[1] else None
        db = rows.sum(0) if ctx.has_bias and needs[2] else None
        return dx, dW, db


def projection(x: Tensor, W: Tensor, b: Tensor | None = None) -> Tensor:
    """`Projection`: x Wᵀ + b for x (..., K), W (N, K), b (N,) or None."""
    return Projection.apply(x, W, b)
