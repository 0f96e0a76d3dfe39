"""Backpropagation through time written by hand (placeholder while it is being written)."""

from __future__ import annotations

from torch import Tensor

from lmtrain.cells import Cell


def manual_layer(cell: Cell, x: Tensor, state: tuple[Tensor, ...], *, reverse: bool = False
                 ) -> tuple[Tensor, tuple[Tensor, ...]]:
    raise NotImplementedError("model.backward: manual is not written yet")
