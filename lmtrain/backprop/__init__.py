"""Backpropagation through time written by hand: one autograd Function per cell, its forward beside
its backward (docs/backprop.md derives the formulas)."""
