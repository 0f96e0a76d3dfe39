"""The compiled time loops of this checkout and of a git revision, alternating in half-second windows over a
minute or more: how each build's time moves with the host's state, not only its median.

    python scripts/loops_over_time.py --revision REV [--cell gru-after] [--sizes '[[64, 128, 256]]']
        [--seconds 60] [--doc docs/benchmarks.md] [--title 'Rows or units']

Builds lmtrain/speed/csrc/kernels.cpp as lmtrain builds it and the kernels of `--revision` (as
scripts/compare_tiles.py does). Then, at each size (B, T, H) of `--sizes` in turn, runs one cell's forward
and backward loops (the recurrent products and gate arithmetic of every step, on random buffers that stay
where they are for the whole run) over and over, the builds taking turns, half a second each, and prints
each window's median per build; then a summary: each build's median, fastest window and slow windows,
and its medians in the windows where the revision's build was slow and in the others. On a shared 2-core
host the same buffers flip between two speeds in stretches of seconds, which a median over a few runs
cannot show (docs/benchmarks.md, "Rows or units").
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch
from compare_tiles import build, kernel_revision, loops, sources_at
from comparison import allocator_settings, cpu_name, doc_file, layer_sizes, positive_number
from doc_sections import write_section

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
    parser.add_argument("--revision", type=kernel_revision, required=True,
                        help="the git revision whose kernels to alternate with")
    parser.add_argument("--cell", choices=["lstm", "gru-after", "rnn"], default="gru-after")
    parser.add_argument("--sizes", type=layer_sizes, default=[(64, 128, 256)],
                        help='(B, T, H) each, e.g. "[[64, 128, 256]]"')
    parser.add_argument("--seconds", type=positive_number, default=60.0, help="how long each size runs")
    parser.add_argument("--doc", type=doc_file, default=None, help="write the summary into this file too")
    parser.add_argument("--title", default="Rows or units", help="the section of --doc to write")
    args = parser.parse_args()
    modules = {"this checkout": build("checkout", kernels.SOURCE, []),
               args.revision: build(args.revision, sources_at(args.revision), [])}
    lines = [f"`python scripts/loops_over_time.py {shlex.join(sys.argv[1:])}`".replace(" `", "`"), "",
             f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, allocator: "
             f"{allocator_settings()}; {args.cell} loops, ms per forward and backward through time: the median of "
             f"each {WINDOW_SECONDS} s window, the builds taking turns for {args.seconds:.0f} s a size; a window "
             f"is slow when over {SLOW}x its build's fastest", "",
             "| B, T, H | build | median | fastest window | slow windows | median where "
             f"{args.revision} is slow | median elsewhere |", "|---|---|---:|---:|---:|---:|---:|"]
    for size in args.sizes:
        lines += over_time(modules, args.cell, size, args.seconds)
    print("\n" + "\n".join(lines))
    if args.doc:
        write_section(args.doc, args.title, "\n".join(lines))


def over_time(modules: dict, cell: str, size: tuple[int, int, int], seconds: float) -> list[str]:
    """Prints each window's median per build as it goes; returns the summary's rows for this size: each
    build's median, fastest window, slow windows, and its medians in the last build's slow windows and
    in the others."""
    B, T, H = size
    run = gru_after_loops(B, T, H) if cell == "gru-after" else loops(cell, B, T, H)
    print(f"{cell} loops at (B, T, H) = ({B}, {T}, {H})\n\n| s | " + " | ".join(modules) + " |\n|---:|"
          + "---:|" * len(modules), flush=True)
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
    reference = list(windows.values())[-1]
    slow_there = [value > SLOW * min(reference) for value in reference]
    rows = []
    for name, values in windows.items():
        there = [value for value, slow in zip(values, slow_there) if slow]
        elsewhere = [value for value, slow in zip(values, slow_there) if not slow]
        rows.append(f"| {B}, {T}, {H} | {name} | {statistics.median(values):.1f} | {min(values):.1f} | "
                    f"{sum(value > SLOW * min(values) for value in values)} of {len(values)} | "
                    f"{median_text(there)} | {median_text(elsewhere)} |")
    return rows


def median_text(values: list[float]) -> str:
    """The median to a tenth, or a dash where no window fell in the group (no slow stretch at all)."""
    return f"{statistics.median(values):.1f}" if values else "-"


if __name__ == "__main__":
    main()
