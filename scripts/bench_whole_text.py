"""Whole-text evaluation speed (`lmtrain eval perplexity --segment 0`): one long sequence, batch 1, the state
carried through it, with the compiled time loops and with the Python loops, alternating.

    python scripts/bench_whole_text.py [--tokens 20000] [--repeats 4] [--doc docs/benchmarks.md] [--title TITLE]

For each cell (the lecture's GRU, PyTorch's GRU, the RNN, the LSTM), a 2x256 character model with random
weights (vocabulary 65) runs the forward pass over `--tokens` random tokens as one sequence without
autograd, as `--segment 0` scores a text. Medians of `--repeats` runs after one warm-up each; tokens/s.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch
from comparison import allocator_settings, cpu_name, doc_file, positive_integer
from doc_sections import write_section

from lmtrain.model.language_model import LanguageModel
from lmtrain.speed import kernels

CELLS = {"gru (the lecture's)": {"cell": "gru"}, "gru (PyTorch's)": {"cell": "gru", "gru_reset": "after"},
         "rnn": {"cell": "rnn"}, "lstm": {"cell": "lstm"}}


@torch.no_grad()
def tokens_per_second(model: LanguageModel, tokens: torch.Tensor, repeats: int) -> dict[bool, float]:
    """Median tokens/s with the compiled loops (True) and the Python loops (False), alternating."""
    times: dict[bool, list[float]] = {True: [], False: []}
    for run in range(repeats + 1):
        for compiled in (True, False):
            with kernels.switched(compiled):
                begin = time.perf_counter()
                model(tokens)
                if run:  # the first of each is the warm-up
                    times[compiled].append(time.perf_counter() - begin)
    return {compiled: tokens.numel() / statistics.median(values) for compiled, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=positive_integer, default=20000)
    parser.add_argument("--repeats", type=positive_integer, default=4)
    parser.add_argument("--doc", type=doc_file, default=None, help="write the table into this file too")
    parser.add_argument("--title", default="Whole texts", help="the section of --doc to write")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokens = torch.randint(2, 65, (1, args.tokens))
    lines = [f"`python scripts/bench_whole_text.py {shlex.join(sys.argv[1:])}`".replace(" `", "`"), "",
             f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, allocator: "
             f"{allocator_settings()}; 2x256 models, {args.tokens:,} tokens as one sequence, batch 1, "
             f"medians of {args.repeats}", "",
             "| cell | compiled loops tokens/s | Python loops tokens/s | ratio |", "|---|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for name, options in CELLS.items():
        model = LanguageModel(65, embed_size=64, hidden_size=256, num_layers=2, **options).eval()
        speed = tokens_per_second(model, tokens, args.repeats)
        row = f"| {name} | {speed[True]:,.0f} | {speed[False]:,.0f} | {speed[True] / speed[False]:.2f}x |"
        print(row, flush=True)
        lines.append(row)
    if args.doc:
        write_section(args.doc, args.title, "\n".join(lines))


if __name__ == "__main__":
    main()
