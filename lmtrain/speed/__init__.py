"""The speed layer: the matrix-product routes (oneDNN, addmm, bfloat16), the compiled time loops and
their one-time build, threads and memory. The model and the backpropagation call into it; it never
imports them."""
