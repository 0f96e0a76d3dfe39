"""lmtrain's speed targets measured in one job on this machine: each measurement against torch.nn or a
plain PyTorch trainer, the target, what was measured, and whether the target is met.

    python scripts/speed_targets.py [--shakespeare PATH/TO/tinyshakespeare/input.txt] [--ptb PATH/TO/ptb]
        [--cells lstm gru gru-lecture gru-simplified rnn] [--sizes JSON] [--repeats 5] [--rounds 2]
        [--tokens 200] [--rss-processes 3] [--placements 1] [--doc FILE] [--title TITLE]

The targets are in float32 (docs/benchmarks.md, "The speed targets", says where each stands and why). Each
row is measured as its own script measures it, with that script's code:
- a layer's training step against its torch.nn layer, the two alternating (scripts/bench_cells.py;
  lmtrain's manual backward as `lmtrain train` runs it): the LSTM at most 0.8x `nn.LSTM`'s time at
  batch 64 ((64, 128, 256), (64, 128, 512) and (64, 128, 1024)), 1.0x at batch 32 and 1; each GRU
  (PyTorch's form, the lecture's, the simplified) at most 0.6x `nn.GRU`'s; the RNN at most 0.8x `nn.RNN`'s.
  With `--placements N`, each side's time is the median over N fresh placements of the layers' buffers
  (scripts/bench_placement.py): one placement's ratio moves by up to a third with where the buffers fell;
- each of those layers' peak RSS over three steps in a fresh process (the median of `--rss-processes`
  processes), at most 1.0x torch.nn's;
- with --shakespeare, `lmtrain train` on Tiny Shakespeare at 1.3x or more the tokens/s of
  scripts/reference_nn_lstm.py, `--rounds` alternating rounds of 200 steps (scripts/compare_train_speed.py);
- with --ptb, one Penn Treebank epoch at 1.5x or more pytorch/examples' tokens/s, validation perplexity no
  worse (scripts/compare_ptb_epoch.py);
- sampling from a 2x512 LSTM (scripts/bench_sampling.py): 16 samples side by side at 20,000 tokens/s or
  more, one at 3,000.
`--sizes` replaces the layer sizes (the LSTM's 0.8x applies at batch 64 and above). Prints the table
as it goes; `--doc` writes it as the section TITLE of FILE. Set the allocator variables first (the table
prints them): see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_cells import REFERENCE, SIZES, peak_rss_medians, time_variants
from bench_sampling import never_ending_model, tokens_per_s, vocabulary
from compare_ptb_epoch import CONFIG as PTB_CONFIG
from compare_ptb_epoch import run_reference as ptb_reference
from compare_train_speed import lmtrain_tokens_per_s, reference_tokens_per_s
from comparison import (
    allocator_settings,
    corpus_settings,
    cpu_name,
    doc_file,
    layer_sizes,
    positive_integer,
    ptb_folder,
    run_lmtrain,
    text_file,
)
from doc_sections import write_section

LMTRAIN = "lmtrain manual"  # bench_cells' variant that `lmtrain train` runs
TRAIN_STEPS = 200


@dataclass
class Row:
    measurement: str
    target: str
    measured: str
    met: bool

    def line(self) -> str:
        return f"| {self.measurement} | {self.target} | {self.measured} | {'met' if self.met else '**not met**'} |"


# A ratio is judged as printed, to two places: 1.004x reads "1.00x" and meets "<= 1.0x".
def at_most(measurement: str, ratio: float, limit: float, detail: str) -> Row:
    return Row(measurement, f"<= {limit:.1f}x", f"{ratio:.2f}x ({detail})", round(ratio, 2) <= limit)


def at_least(measurement: str, ratio: float, limit: float, detail: str) -> Row:
    return Row(measurement, f">= {limit:.1f}x", f"{ratio:.2f}x ({detail})", round(ratio, 2) >= limit)


def layer_limit(cell: str, size: tuple[int, int, int]) -> float:
    """The largest ratio to torch.nn's step time that meets the target."""
    if cell == "lstm":
        return 0.8 if size[0] >= 64 else 1.0
    return 0.8 if cell == "rnn" else 0.6


def layer_rows(cell: str, size: tuple[int, int, int], repeats: int, rss_processes: int,
               placements: int = 1) -> list[Row]:
    B, T, H = size
    name = f"{cell} layer ({B}, {T}, {H})"
    median = time_variants(cell, size, repeats, variants=("torch.nn", LMTRAIN), placements=placements)
    reference, ours = median["torch.nn"], median[LMTRAIN]
    rss = peak_rss_medians(cell, size, rss_processes, ("torch.nn", LMTRAIN))
    return [at_most(f"{name}, time vs {REFERENCE[cell].__name__}", ours / reference, layer_limit(cell, size),
                    f"{1e3 * ours:.1f} against {1e3 * reference:.1f} ms"),
            at_most(f"{name}, peak RSS", rss[LMTRAIN] / max(rss["torch.nn"], 1.0), 1.0,
                    f"{rss[LMTRAIN]:.0f} against {rss['torch.nn']:.0f} MB")]


def shakespeare_row(corpus: Path, rounds: int) -> Row:
    speeds: dict[str, list[float]] = {"reference": [], "lmtrain": []}
    for _ in range(rounds):
        speeds["reference"].append(reference_tokens_per_s(corpus, TRAIN_STEPS))
        speeds["lmtrain"].append(lmtrain_tokens_per_s(corpus, TRAIN_STEPS, []))
    reference, ours = (statistics.median(speeds[side]) for side in ("reference", "lmtrain"))
    return at_least("Tiny Shakespeare run (2x256, batch 32), tokens/s vs reference_nn_lstm.py", ours / reference,
                    1.3, f"{ours:,.0f} against {reference:,.0f}, medians of {rounds} rounds of {TRAIN_STEPS} steps")


def ptb_row(folder: Path) -> Row:
    reference = ptb_reference(folder)
    with tempfile.TemporaryDirectory() as out:
        ours = run_lmtrain(PTB_CONFIG, corpus_settings(folder), [], Path(out) / "lmtrain")
    ratio = ours["tokens_per_s"] / reference["tokens_per_s"]
    no_worse = ours["valid_loss"] <= reference["valid_loss"]
    return Row("one PTB epoch (2x200, bptt 35), tokens/s vs pytorch/examples", ">= 1.5x, perplexity no worse",
               f"{ratio:.2f}x ({ours['tokens_per_s']:,} against {reference['tokens_per_s']:,} tokens/s); "
               f"valid perplexity {math.exp(ours['valid_loss']):.1f} against {math.exp(reference['valid_loss']):.1f}",
               round(ratio, 2) >= 1.5 and no_worse)


def sampling_rows(repeats: int, tokens: int) -> list[Row]:
    tokenizer = vocabulary(65)
    model = never_ending_model(tokenizer)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for num, limit, samples in ((16, 20_000, "16 samples side by side"), (1, 3_000, "one sample")):
        runs = [tokens_per_s(model, tokenizer, num, tokens, generator) for _ in range(repeats + 1)][1:]
        median = statistics.median(runs)
        rows.append(Row(f"sampling from a 2x512 LSTM, {samples}", f">= {limit:,} tokens/s",
                        f"{median:,.0f} tokens/s (median of {repeats})", median >= limit))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shakespeare", type=text_file, default=None, help="Tiny Shakespeare's input.txt")
    parser.add_argument("--ptb", type=ptb_folder, default=None, help="the folder of ptb.{train,valid,test}.txt")
    parser.add_argument("--cells", nargs="+", default=list(REFERENCE), choices=list(REFERENCE))
    parser.add_argument("--sizes", type=layer_sizes, default=None, help='e.g. "[[32, 64, 128]]"')
    parser.add_argument("--repeats", type=positive_integer, default=5,
                        help="alternating steps (layers) or runs (sampling)")
    parser.add_argument("--rounds", type=positive_integer, default=2, help="alternating Tiny Shakespeare rounds")
    parser.add_argument("--tokens", type=positive_integer, default=200, help="tokens a sample")
    parser.add_argument("--rss-processes", type=positive_integer, default=3,
                        help="fresh processes a peak-RSS row is the median of")
    parser.add_argument("--placements", type=positive_integer, default=1,
                        help="fresh placements of a layer's buffers its time is the median over")
    parser.add_argument("--doc", type=doc_file, default=None)
    parser.add_argument("--title", default="Speed targets")
    args = parser.parse_args()
    header = [f"`python scripts/speed_targets.py {shlex.join(sys.argv[1:])}`".replace(" `", "`"), "",
              f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"allocator: {allocator_settings()}", "",
              "| measurement | target | measured | |", "|---|---|---|---|"]
    print("\n".join(header), flush=True)
    lines = []

    def report(rows: list[Row]) -> None:
        for row in rows:
            lines.append(row.line())
            print(row.line(), flush=True)

    for cell in args.cells:
        for size in args.sizes or SIZES:
            report(layer_rows(cell, size, args.repeats, args.rss_processes, args.placements))
    if args.shakespeare:
        report([shakespeare_row(args.shakespeare.resolve(), args.rounds)])
    if args.ptb:
        report([ptb_row(args.ptb.resolve())])
    report(sampling_rows(args.repeats, args.tokens))
    met = sum(line.endswith("| met |") for line in lines)
    summary = f"{met} of {len(lines)} targets met."
    print(f"\n{summary}")
    if args.doc:
        write_section(args.doc, args.title, "\n".join(header + lines + ["", summary]))


if __name__ == "__main__":
    main()
