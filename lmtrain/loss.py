"""The output layer and its loss in one step: the summed cross-entropy of the next-token predictions,

    L = Σ_t −log ŷ(t)[y(t)],   ŷ(t) = softmax(z(t)),   z(t) = W_y a(t) + b_y

and its gradients, with dL/dz(t) = ŷ(t) − onehot(y(t)) (the softmax's and the log's derivatives combined).

Made as logits, then torch's log_softmax and nll_loss, the loss reads or writes a (rows, V) tensor six
times between its forward and backward (log_softmax reads the logits and writes its output; nll_loss's
backward writes a one-hot gradient; log_softmax's backward reads both and writes a third). At Penn
Treebank's 10,000 words and 700 rows a step each is 28 MB, and log_softmax with its backward took 13 ms
of a 95-ms step (torch's profiler, scripts/profile_train_step.py). Here the compiled kernel
(`lmtrain.kernels`) makes the loss and dL/dz in one pass over each row, writing dL/dz over the logits it
no longer needs (2.6 ms a step), and sums it over the rows on the way, dL/db_y = Σ_t dL/dz(t); the
backward is then the two products dL/da = dL/dz W_y and dL/dW_y = (dL/dz)ᵀ a. A PTB training step takes
0.93-0.94x the time (scripts/bench_train_step.py, docs/benchmarks.md).

Without the compiled kernels (float64, CUDA, no compiler) it is `gemm.projection` and torch's
`cross_entropy`: the same numbers (tests/test_loss.py), made the usual way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from lmtrain import gemm, kernels


@gemm.keeps_precision
class ProjectedNLL(Function):
    """The summed NLL of x (..., K) through W (V, K), b (V,) against targets (...) on the compiled kernel."""

    @staticmethod
    def forward(ctx, x: Tensor, W: Tensor, b: Tensor | None, targets: Tensor, ignore_index: int,
                compiled) -> Tensor:
        rows = x.reshape(-1, x.size(-1))
        z = gemm.linear(rows, W, b)                                          # (rows, V) logits
        # dL/db_y = Σ_t dL/dz(t), summed by the kernel as it writes dL/dz: no second pass over z.
        db = torch.empty(W.size(0), dtype=x.dtype) if b is not None and ctx.needs_input_grad[2] else None
        total = compiled.softmax_cross_entropy_(z, targets.reshape(-1).contiguous(), ignore_index, db)
        ctx.save_for_backward(x, W)
        ctx.dz, ctx.db = z, db                                               # z now holds dL/dz
        return torch.tensor(total, dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:
        x, W = ctx.saved_tensors
        dz, needs = ctx.dz, ctx.needs_input_grad
        rows = x.reshape(-1, x.size(-1))
        # grad is the scalar dLoss/dL: it scales the small factors and results, never the (rows, V) dz.
        dx = gemm.mm(dz, W).mul_(grad).view_as(x) if needs[0] else None
        dW = gemm.mm(dz.t(), rows * grad) if needs[1] else None
        db = ctx.db * grad if ctx.db is not None else None
        return dx, dW, db, None, None, None


def projected_nll(x: Tensor, W: Tensor, b: Tensor | None, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Σ −log softmax(x Wᵀ + b)[target] over the positions of `targets` that are not `ignore_index`:
    x (..., K), W (V, K), b (V,) or None, targets (...) of class ids. A scalar of x's dtype."""
    if (compiled := kernels.compiled(x)) is not None:
        return ProjectedNLL.apply(x, W, b, targets, ignore_index, compiled)
    return unfused_nll(x, W, b, targets, ignore_index)


def unfused_nll(x: Tensor, W: Tensor, b: Tensor | None, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """The same sum made the usual way: the logits (`gemm.projection`), then torch's cross_entropy."""
    logits = gemm.projection(x, W, b)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index,
                           reduction="sum")
