"""The matrix products of the recurrences, run by the fastest GEMM at hand: oneDNN's where it runs
(CPU, float32 or bfloat16), ATen's `addmm` (MKL, OpenBLAS, cuBLAS) otherwise.

Why not always `torch.addmm`: on CPU it calls MKL, which runs a recurrence's small per-step products,
(B, H) @ (H, 4H) with B = 32, at about 0.6x of what oneDNN reaches with its weight packed once for the
whole sequence (docs/benchmarks.md; `nn.LSTM` gets its speed from the same oneDNN). oneDNN follows
torch's own switch: `torch.backends.mkldnn.enabled = False` (or `use_onednn(False)` below) makes
every product here an `addmm`. Both compute the same float32 sums; they differ only in summation
order (about 1e-6 relative; tests/test_gemm.py compares them).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.autograd import Function


def _onednn_ops() -> tuple | None:
    try:
        return torch.ops.mkldnn._linear_pointwise, torch.ops.mkldnn._reorder_linear_weight
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return None


_ONEDNN = _onednn_ops() if torch.backends.mkldnn.is_available() else None


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
        if self.onednn:
            W = W.detach()
            self.W = _ONEDNN[1](W, rows) if uses >= PACK_FROM else W.contiguous()  # strided: see `linear`
        else:
            self.W_t = W.detach().t()

    def __call__(self, x: Tensor, add: Tensor | None = None) -> Tensor:
        """x Wᵀ + add, a new (rows, N) tensor; `add` is None, a bias (N,) or a (rows, N) tensor (which
        may be a strided view)."""
        if self.onednn:
            if add is None or add.dim() == 1:
                return _ONEDNN[0](x, self.W, add, "none", [], "")
            return _ONEDNN[0].binary(x, add, self.W, None, "add")
        return x @ self.W_t if add is None else torch.addmm(add, x, self.W_t)


def linear(x: Tensor, W: Tensor, b: Tensor | None = None) -> Tensor:
    """x Wᵀ + b for x (rows, K), W (N, K): one product over all T*B rows at once (the input half of
    every gate, or the gradient reaching the inputs). Weight gradients, dZᵀ X, stay with `torch.mm`:
    oneDNN needs both factors transposed into copies there, and was slower in a side-by-side timing
    (8192 rows: 34 ms against MKL's 24 ms)."""
    if onednn_runs(x):
        # A strided weight (W_inputᵀ for the input gradient) sends oneDNN to a reference path about
        # 100x slower (measured): a contiguous copy of the weight costs next to nothing.
        return _ONEDNN[0](x, W.detach().contiguous(), None if b is None else b.detach(), "none", [], "")
    return x @ W.t() if b is None else torch.addmm(b, x, W.t())


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
        dx = (rows @ W).view_as(x) if needs[0] else None
        dW = rows.t() @ x.reshape(-1, x.size(-1)) if needs[1] else None
        db = rows.sum(0) if ctx.has_bias and needs[2] else None
        return dx, dW, db


def projection(x: Tensor, W: Tensor, b: Tensor | None = None) -> Tensor:
    """`Projection`: x Wᵀ + b for x (..., K), W (N, K), b (N,) or None."""
    return Projection.apply(x, W, b)
