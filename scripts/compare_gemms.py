"""oneDNN's products or MKL's for lmtrain's float32 training on this CPU, alternating in one job: what
`lmtrain.speed.route.onednn_for_float32` (MKL's on x86 CPUs with AVX2 and no AVX-512) rests on.

    python scripts/compare_gemms.py [--cells lstm gru rnn] [--sizes JSON] [--repeats 7]
        [--corpus PATH/TO/tinyshakespeare/input.txt] [--steps 150] [--rounds 3] [--doc docs/benchmarks.md]

Layers: the training step of scripts/bench_cells.py (one layer, input size H, input gradients, the
compiled loops where they are built), its products over all time steps made by oneDNN's linear
(`ONEDNN_FLOAT32` set) and by MKL's addmm (unset), the two alternating; medians. With `--corpus`, also
whole `lmtrain train configs/tinyshakespeare-char.yaml` runs of `--steps` steps, each in its own process,
alternating, their tokens/s over the training steps alone. The ratio is MKL's time over oneDNN's
(below 1: MKL is the faster). `--doc` writes the tables as the section "oneDNN or MKL on this CPU".
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_cells import build, step_function
from compare_train_speed import lmtrain_tokens_per_s
from comparison import allocator_settings, cpu_name, doc_file, layer_sizes, positive_integer, text_file
from doc_sections import write_section

from lmtrain.speed import route
from lmtrain.speed.torch_internals import cpu_capability

LIBRARIES = {"oneDNN": True, "MKL": False}  # route.ONEDNN_FLOAT32 for each


def layer_times(cell: str, size: tuple[int, int, int], repeats: int) -> dict[str, float]:
    """Median seconds of a training step with each library making the products, alternating."""
    B, T, H = size
    x = torch.randn(B, T, H, requires_grad=True)
    step = step_function(build("lmtrain manual", cell, H), x)
    times: dict[str, list[float]] = {library: [] for library in LIBRARIES}
    for round_ in range(repeats + 1):
        for library, onednn in LIBRARIES.items():
            route.ONEDNN_FLOAT32 = onednn
            begin = time.perf_counter()
            step()
            if round_:  # the first round warms both up
                times[library].append(time.perf_counter() - begin)
    return {library: statistics.median(values) for library, values in times.items()}


def run_tokens_per_s(corpus: Path, steps: int, onednn: bool) -> float:
    """Training tokens/s of one `lmtrain train` run in its own process, with `ONEDNN_FLOAT32` set as given."""
    code = (f"import sys; from lmtrain.speed import route; route.ONEDNN_FLOAT32 = {onednn}; "
            "from lmtrain.cli import app; sys.argv = ['lmtrain', *sys.argv[1:]]; app()")
    return lmtrain_tokens_per_s(corpus, steps, [], launcher=(sys.executable, "-c", code))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="+", default=["lstm", "gru", "rnn"],
                        choices=["lstm", "gru", "gru-lecture", "gru-simplified", "rnn"])
    parser.add_argument("--sizes", type=layer_sizes, default=[(32, 64, 128), (64, 128, 256), (64, 128, 512),
                                                               (1, 256, 512)])
    parser.add_argument("--repeats", type=positive_integer, default=7)
    parser.add_argument("--corpus", type=text_file, default=None, help="also compare whole training runs on it")
    parser.add_argument("--steps", type=positive_integer, default=150)
    parser.add_argument("--rounds", type=positive_integer, default=3)
    parser.add_argument("--doc", type=doc_file, default=None)
    args = parser.parse_args()
    if route.ONEDNN_LINEAR is None:
        sys.exit("this torch has no oneDNN linear: nothing to compare")
    lines = [f"`python scripts/compare_gemms.py {shlex.join(sys.argv[1:])}`".replace(" `", "`"), "",
             f"{cpu_name()}, torch capability {cpu_capability()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, allocator: {allocator_settings()}; lmtrain uses oneDNN here: "
             f"{route.ONEDNN_FLOAT32}", "",
             "| cell | B, T, H | oneDNN ms | MKL ms | MKL / oneDNN |", "|---|---|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for cell in args.cells:
        for size in args.sizes:
            times = layer_times(cell, tuple(size), args.repeats)
            row = (f"| {cell} | {', '.join(map(str, size))} | {times['oneDNN'] * 1e3:.1f} | {times['MKL'] * 1e3:.1f} "
                   f"| {times['MKL'] / times['oneDNN']:.2f}x |")
            print(row, flush=True)
            lines.append(row)
    if args.corpus:
        speeds: dict[str, list[float]] = {library: [] for library in LIBRARIES}
        for round_ in range(args.rounds):
            order = list(LIBRARIES.items())
            for library, onednn in order if round_ % 2 == 0 else order[::-1]:
                speeds[library].append(run_tokens_per_s(args.corpus, args.steps, onednn))
        medians = {library: statistics.median(values) for library, values in speeds.items()}
        lines += ["", f"Whole runs, 2x256 LSTM, batch 32, {args.steps} steps, {args.rounds} alternating rounds: "
                  + "; ".join(f"{library} {medians[library]:,.0f} tokens/s "
                              f"({', '.join(f'{v:,.0f}' for v in speeds[library])})" for library in LIBRARIES)
                  + f"; MKL's time / oneDNN's {medians['oneDNN'] / medians['MKL']:.2f}x."]
        print(lines[-1], flush=True)
    if args.doc:
        write_section(args.doc, "oneDNN or MKL on this CPU", "\n".join(lines))


if __name__ == "__main__":
    main()
