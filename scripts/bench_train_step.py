"""A training step with and without this round's two speed-ups, alternating in one process: the compiled
LSTM loops (`lmtrain.kernels`) and the output layer's forward by oneDNN (`gemm.projection`, against
`torch.nn.functional.linear`).

    python scripts/bench_train_step.py PATH/TO/tinyshakespeare/input.txt [--steps 120] [override ...]
    python scripts/bench_train_step.py --config configs/ptb-word.yaml PATH/TO/ptb [--steps 120] [override ...]

Runs the config (default configs/tinyshakespeare-char.yaml; a corpus folder means its
ptb.{train,valid,test}.txt) in a temporary folder. After 10 warm-up steps, every block of 5 steps uses the
next of the four variants in turn, so that the machine's stalls fall on all of them alike; prints the
median step time of each and its ratio to the step with neither.
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
from pathlib import Path

import torch

from lmtrain import gemm, kernels
from lmtrain.config import load_config
from lmtrain.train import Trainer

MALLOC = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
WARM_UP, BLOCK = 10, 5


@contextlib.contextmanager
def variant(compiled: bool, onednn_projection: bool):
    projection = gemm.projection
    if not onednn_projection:
        gemm.projection = torch.nn.functional.linear  # what gemm.projection replaced
    try:
        with kernels.use_compiled(compiled):
            yield
    finally:
        gemm.projection = projection


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--config", default="configs/tinyshakespeare-char.yaml")
    parser.add_argument("--steps", type=int, default=120, help="timed steps (after the warm-up)")
    args = parser.parse_intermixed_args()
    data = ([f"data.{split}={args.corpus / f'ptb.{split}.txt'}" for split in ("train", "valid", "test")]
            if args.corpus.is_dir() else [f"data.path={args.corpus}"])
    variants = list(itertools.product((False, True), repeat=2))  # (compiled, onednn_projection)
    times: dict[tuple[bool, bool], list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as folder:
        config = load_config(args.config, [*data, "data.corpus=null", f"train.max_steps={WARM_UP + args.steps}",
                                           "train.max_epochs=null", "train.max_seconds=null", "train.eval_every=100000",
                                           "train.final_samples=0", f"train.out_dir={folder}/run", *args.overrides])
        trainer = Trainer(config, resume=False, echo=lambda line: None, warn=print, progress_bar=False)
        step, count = trainer._train_step, itertools.count()

        def timed_step(*step_args):
            index = next(count)
            chosen = variants[(index // BLOCK) % len(variants)]
            with variant(*chosen):
                begin = time.perf_counter()
                result = step(*step_args)
                elapsed = time.perf_counter() - begin
            if index >= WARM_UP:
                times[chosen].append(elapsed)
            return result

        trainer._train_step = timed_step
        trainer.run()
    allocator = ", ".join(f"{name}={os.environ[name]}" for name in MALLOC if name in os.environ) or "glibc defaults"
    model = config.model
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"allocator: {allocator}; {args.config} ({model.cell} {model.num_layers}x{model.hidden_size}, batch "
          f"{config.train.batch_size}, bptt {config.train.bptt}), {args.steps} steps in blocks of {BLOCK} per variant\n")
    baseline = statistics.median(times[(False, False)])
    print("| compiled LSTM loops | output layer forward | median step ms | ratio |")
    print("|---|---|---:|---:|")
    for compiled, onednn_projection in variants:
        median = statistics.median(times[(compiled, onednn_projection)])
        print(f"| {'yes' if compiled else 'no'} | {'oneDNN' if onednn_projection else 'F.linear'} | {1e3 * median:.1f} | "
              f"{median / baseline:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
