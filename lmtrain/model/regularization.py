"""Regularisers for recurrent language models, each behind one config key:

- dropout on the non-recurrent connections, `model.input_dropout` (the embeddings x(t)),
  `model.layer_dropout` (between layers, a[l-1](t) into layer l) and `model.output_dropout` (a(t) into
  the softmax) (Zaremba et al. 2014); with `model.locked_dropout` one mask per sequence, the same at
  every time step: variational dropout (Gal & Ghahramani 2016), "locked" in Merity et al. 2017;
- `model.embedding_dropout`: whole words dropped from the vocabulary for a batch, every occurrence of
  a dropped word reads the zero vector (Gal & Ghahramani 2016, section 4.2; Merity et al. 2017, 4.3);
- `model.weight_drop`: DropConnect (Wan et al. 2013) on the recurrent halves `W_aa` of every gate,
  one mask per batch shared by all time steps (Merity et al. 2017, section 2);
- `train.activation_regularization` (AR, α) and `train.temporal_activation_regularization` (TAR, β):
  α mean(m * a(t))² on the dropped last-layer outputs and β mean(a(t) - a(t+1))² on the undropped
  ones, added to the loss (Merity et al. 2017, section 4.6; Merity, McCann & Socher 2017).

Every dropout keeps the expectation: what survives is divided by 1 - p (inverted dropout), so nothing
changes at evaluation, where all of them are off.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F


def _keep_mask(like: Tensor, shape: tuple[int, ...], p: float) -> Tensor:
    """Bernoulli(1 - p) scaled by 1 / (1 - p), of `like`'s dtype and device."""
    return like.new_empty(shape).bernoulli_(1 - p).div_(1 - p)


class SequenceDropout(nn.Module):
    """Dropout on (B, T, D) sequences. `locked=False`: a fresh mask for every element (standard dropout);
    `locked=True`: one mask per sequence and unit, shared by all T steps (variational dropout)."""

    def __init__(self, p: float = 0.0, *, locked: bool = False) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1); got {p}")
        self.p, self.locked = p, locked

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if not self.locked:
            return F.dropout(x, self.p, training=True)
        return x * _keep_mask(x, (x.size(0), 1, x.size(2)), self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, locked={self.locked}"


def embedding_dropout(x: Tensor, tokens: Tensor, vocab_size: int, p: float) -> Tensor:
    """Embeddings x (B, T, E) of `tokens` (B, T) with whole words dropped: each of the `vocab_size` words is
    kept with probability 1 - p for this batch, and scaled by 1 / (1 - p). The same as zeroing rows of
    the embedding matrix (Merity et al. 2017), without a (V, E) mask; ids below 0 (no input) read row 0."""
    if p == 0.0:
        return x
    keep = _keep_mask(x, (vocab_size,), p)
    return x * keep[tokens.clamp(min=0)].unsqueeze(-1)


def drop_connect(W: Tensor, p: float) -> Tensor:
    """W with each weight dropped with probability p, the rest scaled by 1 / (1 - p) (DropConnect)."""
    if p == 0.0:
        return W
    return W * _keep_mask(W, tuple(W.shape), p)


def activation_regularization(a_dropped: Tensor, mask: Tensor | None = None) -> Tensor:
    """AR without its α: the mean of m * a(t) squared over the units of the positions `mask` (B, T)
    keeps (all when None). a_dropped: (B, T, H), the last layer's outputs after output dropout."""
    squares = a_dropped.pow(2).mean(-1)                                   # (B, T)
    return squares.mean() if mask is None else (squares * mask).sum() / mask.sum().clamp(min=1)


def temporal_activation_regularization(a: Tensor, mask: Tensor | None = None) -> Tensor:
    """TAR without its β: the mean of (a(t) - a(t+1)) squared over the units, over the pairs of
    positions both kept by `mask` (B, T). a: (B, T, H), the last layer's outputs before dropout."""
    squares = (a[:, 1:] - a[:, :-1]).pow(2).mean(-1)                      # (B, T-1)
    if mask is None:
        return squares.mean() if squares.numel() else a.new_zeros(())
    pairs = mask[:, 1:] * mask[:, :-1]
    return (squares * pairs).sum() / pairs.sum().clamp(min=1)


def activation_penalty(a: Tensor, a_dropped: Tensor, mask: Tensor | None, *, alpha: float, beta: float) -> Tensor:
    """α AR + β TAR (a zero tensor when both are 0)."""
    penalty = a.new_zeros(())
    if alpha:
        penalty = penalty + alpha * activation_regularization(a_dropped, mask)
    if beta:
        penalty = penalty + beta * temporal_activation_regularization(a, mask)
    return penalty

