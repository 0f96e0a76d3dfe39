"""A training step with and without the last two rounds' speed-ups, alternating in one process: the compiled
LSTM loops (`lmtrain.speed.kernels`), the output layer's forward by oneDNN (`gemm.projection`, against
`torch.nn.functional.linear`), and the output layer fused with its loss (`lmtrain.speed.loss`, against the
logits, then torch's `cross_entropy`).

    python scripts/bench_train_step.py PATH/TO/tinyshakespeare/input.txt [--steps 120] [override ...]
    python scripts/bench_train_step.py --config configs/ptb-word.yaml PATH/TO/ptb [--steps 120] [override ...]

Runs the config (default configs/tinyshakespeare-char.yaml; a corpus folder means its
ptb.{train,valid,test}.txt) in a temporary folder. After 10 warm-up steps, every block of 5 steps uses the
next of the five variants in turn, so that the machine's stalls fall on all of them alike; prints the
median step time of each and its ratio to the step with none of them. `--steps` is at least 21, so that
each variant gets a block.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
from comparison import (
    ROOT,
    allocator_settings,
    checked_config,
    corpus,
    corpus_settings,
    integer_at_least,
    repository_path,
)

from lmtrain.model.language_model import Projection
from lmtrain.speed import gemm, kernels, loss
from lmtrain.training.trainer import Trainer

WARM_UP, BLOCK = 10, 5
# (compiled LSTM loops, oneDNN output layer forward, fused loss): none, then each speed-up added in turn
VARIANTS = [(False, False, False), (True, False, False), (False, True, False), (True, True, False), (True, True, True)]


def variant_at(index: int) -> tuple[bool, bool, bool]:
    """The variant training step `index` runs: a block of BLOCK steps each in turn, the warm-up's too."""
    return VARIANTS[(index // BLOCK) % len(VARIANTS)]


# The fewest timed steps in which every variant runs (fewer leave one without a step time): the blocks
# start at multiples of BLOCK, WARM_UP among them, so the last variant's first step is this many in.
MIN_STEPS = (len(VARIANTS) - 1) * BLOCK + 1


def unfused_nll(self: Projection, x: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """What `Projection.summed_nll` replaced: the logits, then torch's cross-entropy."""
    return loss.unfused_nll(x, self.weight, self.bias, targets, ignore_index)


@contextlib.contextmanager
def variant(compiled: bool, onednn_projection: bool, fused_loss: bool):
    projection, summed_nll = gemm.projection, Projection.summed_nll
    if not onednn_projection:
        gemm.projection = torch.nn.functional.linear  # what gemm.projection replaced
    if not fused_loss:
        Projection.summed_nll = unfused_nll
    try:
        with kernels.switched(compiled):
            yield
    finally:
        gemm.projection, Projection.summed_nll = projection, summed_nll


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=corpus)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--config", default=ROOT / "configs" / "tinyshakespeare-char.yaml")
    parser.add_argument("--steps", type=integer_at_least(MIN_STEPS, f"each variant runs a block of {BLOCK}"),
                        default=120, help=f"timed steps (after the warm-up), {MIN_STEPS} or more")
    args = parser.parse_intermixed_args()
    variants = VARIANTS
    times: dict[tuple[bool, bool, bool], list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as folder:
        config = checked_config(parser, args.config, [
            *corpus_settings(args.corpus), f"train.max_steps={WARM_UP + args.steps}", "train.max_epochs=null",
            "train.max_seconds=null", "train.eval_every=100000", "train.final_samples=0",
            f"train.out_dir={folder}/run", *args.overrides])
        trainer = Trainer(config, resume=False, echo=lambda line: None, warn=print, progress_bar=False)
        step, count = trainer._train_step, itertools.count()

        def timed_step(*step_args):
            index = next(count)
            chosen = variant_at(index)
            with variant(*chosen):
                begin = time.perf_counter()
                result = step(*step_args)
                elapsed = time.perf_counter() - begin
            if index >= WARM_UP:
                times[chosen].append(elapsed)
            return result

        trainer._train_step = timed_step
        trainer.run()
    allocator = allocator_settings()
    model = config.model
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"allocator: {allocator}; {repository_path(args.config)} ({model.cell} {model.num_layers}x"
          f"{model.hidden_size}, batch {config.train.batch_size}, bptt {config.train.bptt}), {args.steps} steps in "
          f"blocks of {BLOCK} per variant\n")
    baseline = statistics.median(times[variants[0]])
    print("| compiled LSTM loops | output layer forward | loss | median step ms | ratio |")
    print("|---|---|---|---:|---:|")
    for compiled, onednn_projection, fused_loss in variants:
        median = statistics.median(times[(compiled, onednn_projection, fused_loss)])
        print(f"| {'yes' if compiled else 'no'} | {'oneDNN' if onednn_projection else 'F.linear'} | "
              f"{'fused' if fused_loss else 'cross_entropy'} | {1e3 * median:.1f} | {median / baseline:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
