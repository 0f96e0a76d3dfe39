"""The compiled time loops of this checkout and of a git revision, alternating in half-second windows over a
minute or more: how each build's time moves with the host's state, not only its median.

    python scripts/loops_over_time.py --revision REV [--cell gru-after] [--sizes '[[64, 128, 256]]'] [--seconds 60]

Builds lmtrain/speed/csrc/kernels.cpp as lmtrain builds it and the kernels of `--revision` (as
scripts/compare_tiles.py does). Then, at each size (B, T, H) of `--sizes` in turn, runs one cell's forward
and backward loops (the recurrent products and gate arithmetic of every step, on random buffers that stay
where they are for the whole run) over and over, the builds taking turns, half a second each, and prints
each window's median per build. On a shared 2-core host the same buffers flip between two speeds in
stretches of seconds, which a median over a few runs cannot show (docs/benchmarks.md, "Rows or units").
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from compare_tiles import build, loops, sources_at
from comparison import allocator_settings, cpu_name, layer_sizes

from lmtrain.speed import kernels

WINDOW_SECONDS = 0.5
SLOW = 1.2  # a window this much slower than the build's fastest window counts as slow


def gru_after_loops(B: int, T: int, H: int):
    """One forward and backward through time of PyTorch's GRU's compiled loops, on random buffers."""
    torch.manual_seed(0)
    gates, W = torch.randn(T, B, 3 * H), torch.randn(3 * H, H) / H ** 0.5
    c, p, b_cc, dA = torch.zeros(T + 1, B, H), torch.empty(T, B, H), torch.randn(H), torch.randn(T + 1, B, H)

    def run(module):
        g = gates.clone()
        module.gru_after_forward(g, c, p, W, b_cc)
        module.gru_after_backward(g, c, p, dA.clone(), W)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revision", required=True, help="the git revision whose kernels to alternate with")
    parser.add_argument("--cell", choices=["lstm", "gru-after", "rnn"], default="gru-after")
    parser.add_argument("--sizes", type=layer_sizes, default=[(64, 128, 256)],
                        help='(B, T, H) each, e.g. "[[64, 128, 256]]"')
    parser.add_argument("--seconds", type=float, default=60.0, help="how long each size runs")
    args = parser.parse_args()
    modules = {"this checkout": build("checkout", kernels.SOURCE, []),
               args.revision: build(args.revision, sources_at(args.revision), [])}
    for size in args.sizes:
        over_time(modules, args.cell, size, args.seconds)


def over_time(modules: dict, cell: str, size: tuple[int, int, int], seconds: float) -> None:
    """Prints each window's median per build, then each build's median, fastest window and slow windows."""
    B, T, H = size
    run = gru_after_loops(B, T, H) if cell == "gru-after" else loops(cell, B, T, H)
    print(f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, allocator: "
          f"{allocator_settings()}; {cell} loops at (B, T, H) = ({B}, {T}, {H}), ms per forward and "
          f"backward, the median of each {WINDOW_SECONDS} s window\n", flush=True)
    print("| s | " + " | ".join(modules) + " |\n|---:|" + "---:|" * len(modules), flush=True)
    windows: dict[str, list[float]] = {name: [] for name in modules}
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        at = time.perf_counter() - start
        for name, module in modules.items():
            times, opened = [], time.perf_counter()
            while time.perf_counter() - opened < WINDOW_SECONDS:
                begin = time.perf_counter()
                run(module)
                times.append(time.perf_counter() - begin)
            windows[name].append(1e3 * statistics.median(times))
        print(f"| {at:.0f} | " + " | ".join(f"{values[-1]:.1f}" for values in windows.values()) + " |", flush=True)
    print(f"\n| build | median ms | fastest window | windows over {SLOW}x the fastest |\n|---|---:|---:|---:|")
    for name, values in windows.items():
        slow = sum(value > SLOW * min(values) for value in values)
        print(f"| {name} | {statistics.median(values):.1f} | {min(values):.1f} | {slow} of {len(values)} |")


if __name__ == "__main__":
    main()
