"""Where one layer's training step spends its time, lmtrain's against torch.nn's, by torch.profiler.

    python scripts/profile_layer.py [--cells lstm gru gru-lecture rnn] [--sizes "[[64, 128, 512]]"] [--steps 5]
        [--doc docs/benchmarks.md] [--title TITLE]

For each cell and size (B, T, H; input size H, one layer, input gradients on, float32, the step of
scripts/bench_cells.py), lmtrain's step is split into what its parts cost per step, with the arithmetic
each part does and the rate it runs at:
- "products over all steps": the input half W_x x of every gate and the gradients reaching x (oneDNN's
  linear), and the weight gradients (torch.mm): four products of T*B rows;
- "time loops": the Function's forward and backward themselves, in which the compiled loops make every
  step's recurrent product and gate arithmetic;
- "the rest": copies into time-major buffers, bias sums, autograd.
torch.nn's step is split by operator. Rates are GFLOP/s of the parts' multiply-adds (2 flops each).
The last row of each size is the bound the machine sets: the step's arithmetic at the best rate its GEMMs
reach in this job (torch.mm and oneDNN's linear, one (2048, 2048) by (2048, 2048) product, best of 5), the
time no step doing these products can beat with these libraries.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections import defaultdict

import torch
from bench_cells import build, step_function
from comparison import allocator_settings, cpu_name, doc_file, layer_sizes, positive_integer
from doc_sections import write_section
from torch.profiler import ProfilerActivity, profile

from lmtrain.speed.torch_internals import ONEDNN_LINEAR

GATES = {"rnn": 1, "gru": 3, "gru-lecture": 3, "gru-simplified": 2, "lstm": 4}


def products_flops(cell: str, B: int, T: int, H: int) -> tuple[float, float]:
    """Flops of (the four products over all steps, the recurrent products inside the loops) per step."""
    G = GATES[cell]
    per_product = 2 * T * B * H * G * H                                    # (T*B, H) by (H, G*H)
    return 4 * per_product, 2 * per_product                                # forward and backward through time


def self_times(step, steps: int) -> dict[str, float]:
    """Self CPU ms per step of every operator, over `steps` profiled steps."""
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            step()
    return {event.key: event.self_cpu_time_total / 1e3 / steps for event in profiler.key_averages()}


def best_gemm_rate(size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of the faster of torch.mm and oneDNN's linear on one (size, size) product, best of `repeats`."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    products = [lambda: torch.mm(a, b)]
    if ONEDNN_LINEAR is not None:
        products.append(lambda: ONEDNN_LINEAR(a, b))
    best = float("inf")
    for product in products:
        product()
        for _ in range(repeats):
            begin = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - begin)
    return 2 * size**3 / best / 1e9


def lmtrain_parts(times: dict[str, float]) -> dict[str, float]:
    parts: dict[str, float] = defaultdict(float)
    for name, ms in times.items():
        if name in ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm"):
            parts["products over all steps"] += ms
        elif name.endswith("Function") or name.endswith("FunctionBackward"):
            parts["time loops"] += ms
        else:
            parts["the rest"] += ms
    return parts


def torch_parts(times: dict[str, float]) -> dict[str, float]:
    parts: dict[str, float] = defaultdict(float)
    for name, ms in times.items():
        key = name if name in ("aten::mm", "aten::addmm", "aten::mkldnn_rnn_layer",
                               "aten::mkldnn_rnn_layer_backward") else "the rest"
        parts[key] += ms
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="+", default=["lstm", "gru", "gru-lecture", "rnn"], choices=sorted(GATES))
    parser.add_argument("--sizes", type=layer_sizes, default=[(64, 128, 512)])
    parser.add_argument("--steps", type=positive_integer, default=5)
    parser.add_argument("--doc", type=doc_file, default=None,
                        help="write the table as the section 'Where a layer's step goes' (or --title)")
    parser.add_argument("--title", default="Where a layer's step goes", help="the section of --doc to write")
    args = parser.parse_args()
    lines = [f"`python scripts/profile_layer.py {shlex.join(sys.argv[1:])}`".replace(" `", "`"), "",
             f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"allocator: {allocator_settings()}; "
             f"self CPU ms per step, mean of {args.steps} profiled steps after 3 unprofiled", "",
             "| cell | B, T, H | side | part | ms | GFLOP | GFLOP/s |", "|---|---|---|---|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    gemm_rate = best_gemm_rate()
    for cell in args.cells:
        for B, T, H in args.sizes:
            x = torch.randn(B, T, H, requires_grad=True)
            steps = {variant: step_function(build(variant, cell, H), x) for variant in ("lmtrain manual", "torch.nn")}
            for step in steps.values():
                for _ in range(3):
                    step()
            over_all, in_loops = products_flops(cell, B, T, H)
            flops = {"products over all steps": over_all, "time loops": in_loops}
            rows = []
            for side, split in (("lmtrain", lmtrain_parts), ("torch.nn", torch_parts)):
                parts = split(self_times(steps["lmtrain manual" if side == "lmtrain" else "torch.nn"], args.steps))
                parts["whole step"] = sum(parts.values())
                for part, ms in sorted(parts.items(), key=lambda item: (item[0] == "whole step", -item[1])):
                    work = flops.get(part) if side == "lmtrain" else None
                    if part == "whole step":
                        work = over_all + in_loops
                    work_text, rate = (f"{work / 1e9:.1f}", f"{work / ms / 1e6:.0f}") if work else ("", "")
                    rows.append(f"| {cell} | {B}, {T}, {H} | {side} | {part} | {ms:.1f} | {work_text} | {rate} |")
            work = over_all + in_loops
            rows.append(f"| {cell} | {B}, {T}, {H} | bound | the products alone at the machine's best GEMM rate "
                        f"| {work / gemm_rate / 1e6:.1f} | {work / 1e9:.1f} | {gemm_rate:.0f} |")
            print("\n".join(rows), flush=True)
            lines += rows
    if args.doc:
        write_section(args.doc, args.title, "\n".join(lines))


if __name__ == "__main__":
    main()
