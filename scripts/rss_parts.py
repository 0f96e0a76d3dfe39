"""What a layer's peak RSS is made of: the buffers a training step holds at once, where glibc's heap puts
them, and the libraries' code paged in, for `torch.nn` and lmtrain side by side.

    python scripts/rss_parts.py [--cells rnn gru gru-lecture] [--sizes JSON] [--processes 5]
        [--doc docs/benchmarks.md] [--title TITLE]

Each figure is the median over `--processes` fresh processes that run three training steps of the layer
(scripts/bench_cells.py's step), less the median of processes that only build the input, measured three
ways:

- peak RSS (VmHWM) with the allocator settings this script runs with, as the speed targets measure it:
  with the settings of the benchmarks (MALLOC_MMAP_THRESHOLD_=33554432, ...), buffers under 32 MB come
  from glibc's heap, which keeps freed memory, so the peak counts how the step's buffers happened to fit
  there as well as how many were alive at once;
- peak RSS with every allocation of 64 KiB or more mapped on its own and returned to the system when freed
  (MALLOC_MMAP_THRESHOLD_=65536, MALLOC_TRIM_THRESHOLD_=0, MALLOC_TOP_PAD_=0): the most memory the step's
  live buffers held at once, plus code;
- RssFile at the end: file-backed pages, which for these processes are the code of the shared libraries
  they ran (libtorch_cpu's oneDNN kernels for lmtrain's products, its MKL calls for `torch.nn`'s).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

import torch
from bench_cells import REFERENCE, memory_medians
from comparison import allocator_settings, cpu_name, doc_file, layer_sizes, positive_integer
from doc_sections import write_section

# The sizes whose peak-RSS targets missed in docs/benchmarks.md ("Speed targets on an AMD EPYC with AVX-512").
CASES = (("rnn", (32, 64, 128)), ("rnn", (64, 128, 256)), ("gru", (32, 64, 128)), ("gru", (1, 256, 512)),
         ("gru-lecture", (1, 256, 512)))
LIVE = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"}
SIDES = ("torch.nn", "lmtrain manual")


def ratio(numbers: dict[str, float]) -> str:
    reference, ours = numbers["torch.nn"], numbers["lmtrain manual"]
    return f"{reference:.1f} / {ours:.1f} ({ours / max(reference, 0.1):.2f}x)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", default=None, choices=sorted(REFERENCE),
                        help="with --sizes, every cell at every size (default: the sizes the targets missed)")
    parser.add_argument("--sizes", type=layer_sizes, default=None, help='e.g. "[[32, 64, 128]]"')
    parser.add_argument("--processes", type=positive_integer, default=5)
    parser.add_argument("--doc", type=doc_file, default=None, help="write the markdown table here too")
    parser.add_argument("--title", default="Where a layer's peak RSS goes")
    args = parser.parse_args()
    if (args.cells is None) != (args.sizes is None):
        parser.error("give --cells and --sizes together, or neither")
    cases = CASES if args.cells is None else [(cell, size) for cell in args.cells for size in args.sizes]
    settings, live = dict(os.environ), {**os.environ, **LIVE}
    header = [f"`python scripts/rss_parts.py {shlex.join(sys.argv[1:])}`".replace(" `", "`"), "",
              f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, allocator: {allocator_settings()}; "
              f"medians of {args.processes} processes a side, MB above a process that only built the input", "",
              "| cell | B, T, H | peak RSS, these settings: torch.nn / lmtrain | peak RSS, buffers mapped alone: "
              "torch.nn / lmtrain | libraries' code (RssFile): torch.nn / lmtrain | live peak less code: "
              "torch.nn / lmtrain |",
              "|---|---|---:|---:|---:|---:|"]
    print("\n".join(header), flush=True)
    rows = []
    for cell, (B, T, H) in cases:
        kept, alone = (memory_medians(cell, (B, T, H), args.processes, SIDES, environment)
                       for environment in (settings, live))
        code = {side: alone[side]["RssFile"] for side in SIDES}
        rows.append(f"| {cell} | {B}, {T}, {H} | {ratio({side: kept[side]['VmHWM'] for side in SIDES})} | "
                    f"{ratio({side: alone[side]['VmHWM'] for side in SIDES})} | {ratio(code)} | "
                    f"{ratio({side: alone[side]['VmHWM'] - code[side] for side in SIDES})} |")
        print(rows[-1], flush=True)
    if args.doc:
        write_section(args.doc, args.title, "\n".join(header + rows))


if __name__ == "__main__":
    main()
