"""The product that makes a layer's input gradient, dx = dz W_input for all T*B rows at once, by oneDNN's
linear (which takes W_inputᵀ as a contiguous copy of the weight) and by torch.mm (MKL, the weight as
stored), alternating in one job: what `lmtrain.speed.gemm.times_weight`'s choice rests on.

    python scripts/compare_input_gradient.py [--cells lstm gru rnn] [--sizes JSON] [--repeats 15]
        [--doc docs/benchmarks.md]

For each cell and layer size (B, T, H) of scripts/bench_cells.py, the product of that layer's backward:
dz (B*T, G*H) times W_input (G*H, H), G the cell's gate count. The ratio is torch.mm's time over
oneDNN's (below 1: torch.mm is the faster); the last column is the product lmtrain makes there, and the
one before it the weight copy that oneDNN's route adds to the backward's peak memory. Then, at each size
where lmtrain makes it by torch.mm on a oneDNN route (none where the route leaves float32 products to
MKL, on AVX2 CPUs), the layer's whole training step (scripts/bench_cells.py's "lmtrain
manual") as lmtrain makes it and with the product by oneDNN, alternating: medians of the step's
time, and of the peak RSS of three fresh processes each. `--doc` writes the tables as the section
"The input gradient's product".
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch
from bench_cells import SIZES, build, peak_rss_mb, step_function
from comparison import allocator_settings, cpu_name, doc_file, layer_sizes, positive_integer
from doc_sections import write_section

from lmtrain.speed import gemm
from lmtrain.speed.gemm import times_weight_by_onednn, use_onednn
from lmtrain.speed.route import choose
from lmtrain.speed.torch_internals import ONEDNN_LINEAR

GATES = {"rnn": 1, "gru-simplified": 2, "gru": 3, "gru-lecture": 3, "lstm": 4}


def always_onednn(rows: int, weight_rows: int, route) -> bool:
    """What lmtrain's choice is measured against: the product by oneDNN whenever the route has oneDNN."""
    return route.onednn and not route.mixed


CHOICES = {"lmtrain's choice": times_weight_by_onednn, "always oneDNN": always_onednn}
# each in a fresh process, for its peak RSS; both import this script, so that both start alike
SETUP = {"lmtrain's choice": "import compare_input_gradient",
         "always oneDNN": "import compare_input_gradient as c; c.gemm.times_weight_by_onednn = c.always_onednn"}


def product_times(rows: int, gates_width: int, inputs: int, repeats: int) -> dict[str, float]:
    """Median seconds of dz W by each product, alternating after one warm-up call of each."""
    dz, W = torch.randn(rows, gates_width), torch.randn(gates_width, inputs)
    # what `linear` does with Wᵀ on a oneDNN route, called directly: a CPU whose route has no oneDNN
    # for float32 (AVX2) still shows what oneDNN would cost there
    products = {"oneDNN": lambda: ONEDNN_LINEAR(dz, W.t().contiguous()),
                "torch.mm": lambda: torch.mm(dz, W)}
    times: dict[str, list[float]] = {name: [] for name in products}
    for round_ in range(repeats + 1):
        for name, product in products.items():
            begin = time.perf_counter()
            product()
            if round_:
                times[name].append(time.perf_counter() - begin)
    return {name: statistics.median(values) for name, values in times.items()}


def chosen(rows: int, gates_width: int, choice=times_weight_by_onednn) -> str:
    """Which product `times_weight` makes for these shapes on this machine (with `choice` deciding)."""
    return "oneDNN" if choice(rows, gates_width, choose(torch.zeros(1), compiled=False)) else "torch.mm"


def layer_step_times(cell: str, size: tuple[int, int, int], repeats: int) -> dict[str, float]:
    """Median seconds of the layer's training step with each of `CHOICES`, alternating."""
    B, T, H = size
    x = torch.randn(B, T, H, requires_grad=True)
    step = step_function(build("lmtrain manual", cell, H), x)
    times: dict[str, list[float]] = {name: [] for name in CHOICES}
    try:
        for round_ in range(repeats + 1):
            for name, choice in CHOICES.items():
                gemm.times_weight_by_onednn = choice
                begin = time.perf_counter()
                step()
                if round_:
                    times[name].append(time.perf_counter() - begin)
    finally:
        gemm.times_weight_by_onednn = times_weight_by_onednn
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="+", default=["rnn", "gru", "lstm"], choices=sorted(GATES))
    parser.add_argument("--sizes", type=layer_sizes, default=None, help='e.g. "[[1, 256, 512]]"')
    parser.add_argument("--repeats", type=positive_integer, default=15)
    parser.add_argument("--doc", type=doc_file, default=None, help="write the table into this file's section too")
    args = parser.parse_args()
    if ONEDNN_LINEAR is None:
        parser.error("this torch has no oneDNN linear to compare with")
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
    changed = [(cell, size) for cell in args.cells for size in args.sizes or SIZES
               if len({chosen(size[0] * size[1], GATES[cell] * size[2], choice) for choice in CHOICES.values()}) > 1]
    if changed:
        layer_lines = ["", "The layer's training step where lmtrain makes the product by torch.mm; medians of "
                       f"{args.repeats} alternating steps, peak RSS medians of 3 fresh processes each:", "",
                       "| cell | B, T, H | lmtrain's choice ms | always oneDNN ms | ratio | "
                       "peak RSS MB, lmtrain's choice / always oneDNN |", "|---|---|---:|---:|---:|---|"]
        print("\n".join(layer_lines), flush=True)
        for cell, (B, T, H) in changed:
            median = layer_step_times(cell, (B, T, H), args.repeats)
            peaks: dict[str, list[float]] = {name: [] for name in CHOICES}
            for _ in range(3):
                for name in CHOICES:
                    peaks[name].append(peak_rss_mb("lmtrain manual", cell, (B, T, H), setup=SETUP[name]))
            ours, forced_ = median["lmtrain's choice"], median["always oneDNN"]
            row = (f"| {cell} | {B}, {T}, {H} | {ours * 1e3:.1f} | {forced_ * 1e3:.1f} | {ours / forced_:.2f}x | "
                   + " / ".join(f"{statistics.median(values):.0f}" for values in peaks.values()) + " |")
            print(row, flush=True)
            layer_lines.append(row)
        lines += layer_lines
    if args.doc:
        write_section(args.doc, "The input gradient's product", "\n".join(lines))


if __name__ == "__main__":
    main()
