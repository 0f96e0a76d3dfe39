"""How much a layer's step time moves with where its buffers lie: the same step, timed over fresh buffers.

    python scripts/bench_placement.py [--cells lstm] [--sizes JSON] [--placements 12] [--repeats 5]
        [--doc docs/benchmarks.md] [--title TITLE]

For each cell and size (B, T, H), `--placements` times over: a fresh input, fresh `torch.nn` and lmtrain
layers (as scripts/bench_cells.py builds them) and a heap moved by a few small allocations kept alive,
then `--repeats` alternating training steps of each. Prints each placement's median step of both sides,
and over the placements the fastest, the median and the slowest, with the ratio of the slowest to the
fastest: what one process's figure can be off by when the buffers fell badly, which a benchmark's
repeats inside that process cannot see.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys

import torch
from bench_cells import REFERENCE, placement_medians
from comparison import allocator_settings, cpu_name, doc_file, layer_sizes, positive_integer
from doc_sections import write_section

SIDES = ("torch.nn", "lmtrain manual")


def placement_times(cell: str, size: tuple[int, int, int], placements: int, repeats: int) -> dict[str, list[float]]:
    """Each side's median step (seconds) in each of `placements` fresh placements, printed as they come."""
    def echo(placement: int, medians: dict[str, float]) -> None:
        print(f"  {cell} {size} placement {placement}: " +
              ", ".join(f"{side} {1e3 * medians[side]:.1f} ms" for side in SIDES), flush=True)
    return placement_medians(cell, size, repeats, variants=SIDES, placements=placements, echo=echo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="+", default=["lstm"], choices=sorted(REFERENCE))
    parser.add_argument("--sizes", type=layer_sizes, default=((32, 64, 256), (64, 128, 256), (64, 128, 512)),
                        help='e.g. "[[64, 128, 256]]"')
    parser.add_argument("--placements", type=positive_integer, default=12)
    parser.add_argument("--repeats", type=positive_integer, default=5)
    parser.add_argument("--doc", type=doc_file, default=None, help="write the markdown table here too")
    parser.add_argument("--title", default="Where a layer's buffers lie")
    args = parser.parse_args()
    header = [f"`python scripts/bench_placement.py {shlex.join(sys.argv[1:])}`".replace(" `", "`"), "",
              f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, allocator: "
              f"{allocator_settings()}; each side's median of {args.repeats} alternating steps in each of "
              f"{args.placements} placements", "",
              "| cell | B, T, H | side | fastest ms | median ms | slowest ms | slowest / fastest |",
              "|---|---|---|---:|---:|---:|---:|"]
    rows = []
    for cell in args.cells:
        for size in args.sizes:
            medians = placement_times(cell, size, args.placements, args.repeats)
            for side in SIDES:
                values = medians[side]
                rows.append(f"| {cell} | {', '.join(map(str, size))} | {side} | {1e3 * min(values):.1f} | "
                            f"{1e3 * statistics.median(values):.1f} | {1e3 * max(values):.1f} | "
                            f"{max(values) / min(values):.2f}x |")
                print(rows[-1], flush=True)
    print("\n".join(header + rows))
    if args.doc:
        write_section(args.doc, args.title, "\n".join(header + rows))


if __name__ == "__main__":
    main()
