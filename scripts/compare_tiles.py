"""The compiled time loops with the per-step product's two register tiles, alternating in one job.

    python scripts/compare_tiles.py [--repeats 7] [--doc docs/benchmarks.md]

Builds lmtrain/speed/csrc/kernels.cpp twice with this CPU's flags (`lmtrain.speed.kernels.spec()`): as
lmtrain builds it (with AVX-512: tiles of 6 rows by 32 columns, 12 sums) and with `-DLMTRAIN_SMALL_TILES`
(4 rows by 16 columns, 4 sums: the AVX2 tile, and AVX-512's before), into folders of their own under the
system's temporary folder. Then times the RNN's and the LSTM's forward and backward loops alone (the
recurrent products and gate arithmetic of every step; no products over all steps, no Python), the two
builds alternating, and prints medians, the ratio and the loops' rate in GFLOP/s of their recurrent
products (2 flops a multiply-add).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from comparison import allocator_settings, cpu_name
from doc_sections import write_section
from torch.utils.cpp_extension import load

from lmtrain.speed import kernels

SIZES = ((32, 64, 128), (20, 35, 200), (64, 128, 256), (64, 128, 512), (1, 256, 512))
BUILDS = {"6x32": [], "4x16": ["-DLMTRAIN_SMALL_TILES"]}


def build(name: str, defines: list[str]):
    spec = kernels.spec()
    folder = Path(tempfile.gettempdir()) / f"lmtrain-compare-tiles-{name}"
    folder.mkdir(exist_ok=True)
    return load(name=f"lmtrain_tiles_{name.replace('x', '_')}", sources=[str(kernels.SOURCE)],
                extra_cflags=[*spec.cflags, *defines], extra_ldflags=list(spec.ldflags), build_directory=str(folder))


def loops(cell: str, B: int, T: int, H: int):
    """One forward and backward through time of `cell`'s compiled loops on random buffers, for a module."""
    torch.manual_seed(0)
    a, dA = torch.zeros(T + 1, B, H), torch.randn(T + 1, B, H)
    if cell == "rnn":
        z, W = torch.randn(T, B, H), torch.randn(H, H) / H ** 0.5
        return lambda module: (module.rnn_forward(z.clone(), a, W), module.rnn_backward(a, dA.clone(), W))
    gates, W = torch.randn(T, B, 4 * H), torch.randn(4 * H, H) / H ** 0.5
    c, tanh_c, dc = torch.zeros(T + 1, B, H), torch.empty(T, B, H), torch.zeros(B, H)

    def run(module):
        g = gates.clone()
        module.lstm_forward(g, a, c, tanh_c, W)
        module.lstm_backward(g, c, tanh_c, dA, dc, W)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--doc", type=Path, default=None,
                        help="write the table as the section 'The product's register tile'")
    args = parser.parse_args()
    modules = {name: build(name, defines) for name, defines in BUILDS.items()}
    lines = [f"`python scripts/compare_tiles.py {' '.join(sys.argv[1:])}`".replace(" `", "`"), "",
             f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"build {kernels.spec().module}, "
             f"allocator: {allocator_settings()}; medians of {args.repeats} alternating runs", "",
             "| cell | B, T, H | 6x32 ms | 4x16 ms | ratio | 6x32 GFLOP/s | 4x16 GFLOP/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for cell in ("rnn", "lstm"):
        for B, T, H in SIZES:
            run = loops(cell, B, T, H)
            times: dict[str, list[float]] = {name: [] for name in modules}
            for module in modules.values():
                run(module)
            for _ in range(args.repeats):
                for name, module in modules.items():
                    begin = time.perf_counter()
                    run(module)
                    times[name].append(time.perf_counter() - begin)
            median = {name: statistics.median(values) for name, values in times.items()}
            flops = 2 * 2 * T * B * H * H * (4 if cell == "lstm" else 1)  # forward and backward products
            big, small = median["6x32"], median["4x16"]
            row = (f"| {cell} | {B}, {T}, {H} | {1e3 * big:.2f} | {1e3 * small:.2f} | {big / small:.2f}x | "
                   f"{flops / big / 1e9:.0f} | {flops / small / 1e9:.0f} |")
            print(row, flush=True)
            lines.append(row)
    if args.doc:
        write_section(args.doc, "The product's register tile", "\n".join(lines))


if __name__ == "__main__":
    main()
