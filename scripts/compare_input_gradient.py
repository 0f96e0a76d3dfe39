"""The product that makes a layer's input gradient, dx = dz W_input for all T*B rows at once, by oneDNN's
linear (which takes W_inputᵀ as a contiguous copy of the weight) and by torch.mm (MKL, the weight as
stored), alternating in one job: what `lmtrain.speed.gemm.times_weight`'s choice rests on.

    python scripts/compare_input_gradient.py [--cells lstm gru rnn] [--sizes JSON] [--repeats 15]
        [--doc docs/benchmarks.md]

For each cell and layer size (B, T, H) of scripts/bench_cells.py, the product of that layer's backward:
dz (B*T, G*H) times W_input (G*H, H), G the cell's gate count. The ratio is torch.mm's time over
oneDNN's (below 1: torch.mm is the faster); the last column is the product lmtrain makes there, and the
one before it the weight copy that oneDNN's route adds to the backward's peak memory. `--doc` writes the
table as the section "The input gradient's product".
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_cells import SIZES
from comparison import allocator_settings, cpu_name, layer_sizes
from doc_sections import write_section

from lmtrain.speed.gemm import linear, times_weight_by_onednn, use_onednn
from lmtrain.speed.route import choose

GATES = {"rnn": 1, "gru-simplified": 2, "gru": 3, "lstm": 4}


def product_times(rows: int, gates_width: int, inputs: int, repeats: int) -> dict[str, float]:
    """Median seconds of dz W by each product, alternating after one warm-up call of each."""
    dz, W = torch.randn(rows, gates_width), torch.randn(gates_width, inputs)
    route = choose(dz, compiled=False)
    products = {"oneDNN": lambda: linear(dz, W.t(), None, route), "torch.mm": lambda: torch.mm(dz, W)}
    times: dict[str, list[float]] = {name: [] for name in products}
    for round_ in range(repeats + 1):
        for name, product in products.items():
            begin = time.perf_counter()
            product()
            if round_:
                times[name].append(time.perf_counter() - begin)
    return {name: statistics.median(values) for name, values in times.items()}


def chosen(rows: int, gates_width: int) -> str:
    """Which product `times_weight` makes for these shapes on this machine."""
    return "oneDNN" if times_weight_by_onednn(rows, gates_width, choose(torch.zeros(1), compiled=False)) else "torch.mm"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="+", default=["rnn", "gru", "lstm"], choices=sorted(GATES))
    parser.add_argument("--sizes", type=layer_sizes, default=None, help='e.g. "[[1, 256, 512]]"')
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--doc", type=Path, default=None, help="write the table into this file's section too")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    lines = [f"`python scripts/compare_input_gradient.py {shlex.join(sys.argv[1:])}`".replace(" `", "`"),
             f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, allocator: "
             f"{allocator_settings()}; medians of {args.repeats} alternating products", "",
             "| cell | B, T, H | dz rows x W_input | oneDNN ms | torch.mm ms | torch.mm / oneDNN | "
             "oneDNN's copy of W_inputᵀ MB | lmtrain makes it by |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    print("\n".join(lines), flush=True)
    with use_onednn(True):
        for cell in args.cells:
            for B, T, H in args.sizes or SIZES:
                rows, width = B * T, GATES[cell] * H
                median = product_times(rows, width, H, args.repeats)
                row = (f"| {cell} | {B}, {T}, {H} | {rows} x ({width}, {H}) | {median['oneDNN'] * 1e3:.2f} | "
                       f"{median['torch.mm'] * 1e3:.2f} | {median['torch.mm'] / median['oneDNN']:.2f}x | "
                       f"{width * H * 4 / 2**20:.1f} | {chosen(rows, width)} |")
                print(row, flush=True)
                lines.append(row)
    if args.doc:
        write_section(args.doc, "The input gradient's product", "\n".join(lines))


if __name__ == "__main__":
    main()
