"""The output layer and its loss in one step: the summed cross-entropy of the next-token predictions,

    L = Σ_t −log ŷ(t)[y(t)],   ŷ(t) = softmax(z(t)),   z(t) = W_y a(t) + b_y

and its gradients, with dL/dz(t) = ŷ(t) − onehot(y(t)) (the softmax's and the log's derivatives combined).

Made as logits, then torch's log_softmax and nll_loss, the loss reads or writes a (rows, V) tensor six
times between its forward and backward (log_softmax reads the logits and writes its output; nll_loss's
backward writes a one-hot gradient; log_softmax's backward reads both and writes a third): at Penn
Treebank's 10,000 words and 700 rows a step, each is 28 MB (what that costs: docs/benchmarks.md,
scripts/profile_train_step.py). Here the compiled kernel
(`lmtrain.speed.kernels`) makes the loss and dL/dz in one pass over each row, writing dL/dz over the logits it
no longer needs, and sums it over the rows on the way, dL/db_y = Σ_t dL/dz(t); then the two products
dL/da = dL/dz W_y and dL/dW_y = (dL/dz)ᵀ a, a chunk of rows at a time so that the (rows, V) logits are
never all held (docs/benchmarks.md).

Without the compiled kernels (float64, CUDA, no compiler) it is `gemm.projection` and torch's
`cross_entropy`: the same numbers (tests/test_loss.py), made the usual way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from lmtrain.speed import gemm
from lmtrain.speed.route import Route, choose, runs_on_its_route

# The logits made at once: rows of z within this many floats (16 MB), so that the output layer's memory
# does not grow with batch x bptt x vocabulary (a 2048 x 13,600 step held 111 MB of logits).
LOGITS_BUDGET = 1 << 22


@runs_on_its_route
class ProjectedNLL(Function):
    """The summed NLL of x (..., K) through W (V, K), b (V,) against targets (...) on the compiled kernel.

    The rows go through in chunks of at most LOGITS_BUDGET logits: each chunk's z is made, turned into
    dL/dz by the kernel, and at once into its share of the gradients, dL/dx = dL/dz W_y and
    dL/dW_y += (dL/dz)ᵀ x, so no more than one chunk of (rows, V) is ever held. The backward then only
    scales what the forward kept by dLoss/dL."""

    @staticmethod
    def forward(ctx, route: Route, x: Tensor, W: Tensor, b: Tensor | None, targets: Tensor,
                ignore_index: int) -> Tensor:
        rows, y = x.reshape(-1, x.size(-1)), targets.reshape(-1).contiguous()
        needs = ctx.needs_input_grad[1:]
        dx = torch.empty_like(rows) if needs[0] else None                   # (rows, K)
        dW = torch.zeros(W.shape, dtype=x.dtype) if needs[1] else None     # (V, K)
        db = torch.zeros(W.size(0), dtype=x.dtype) if b is not None and needs[2] else None
        db_chunk = torch.empty_like(db) if db is not None else None
        total, step = 0.0, max(1, LOGITS_BUDGET // W.size(0))
        for start in range(0, rows.size(0), step):
            x_chunk = rows[start:start + step]
            z = gemm.linear(x_chunk, W, b, route)                                   # (chunk, V) logits
            # Σ_t dL/dz(t) is summed by the kernel as it writes dL/dz over z: no second pass.
            total += route.loops.softmax_cross_entropy_(z, y[start:start + step], ignore_index, db_chunk)
            if db is not None:
                db += db_chunk
            if dx is not None:
                dx[start:start + step] = gemm.mm(z, W, route)
            if dW is not None:
                dW += gemm.mm(z.t(), x_chunk, route)
        ctx.x_shape, ctx.gradients = x.shape, (dx, dW, db)
        return torch.tensor(total, dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:
        # grad is the scalar dLoss/dL: it scales the gradients the forward made.
        dx, dW, db = (None if g is None else g.mul_(grad) for g in ctx.gradients)
        ctx.gradients = None
        return None if dx is None else dx.view(ctx.x_shape), dW, db, None, None


def projected_nll(x: Tensor, W: Tensor, b: Tensor | None, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Σ −log softmax(x Wᵀ + b)[target] over the positions of `targets` that are not `ignore_index`:
    x (..., K), W (V, K), b (V,) or None, targets (...) of class ids. A scalar of x's dtype."""
    if (route := choose(x)).loops is not None:
        return ProjectedNLL.apply(route, x, W, b, targets, ignore_index)
    return unfused_nll(x, W, b, targets, ignore_index)


def unfused_nll(x: Tensor, W: Tensor, b: Tensor | None, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """The same sum made the usual way: the logits (`gemm.projection`), then torch's cross_entropy."""
    logits = gemm.projection(x, W, b)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index,
                           reduction="sum")
