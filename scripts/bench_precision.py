"""`train.precision`: a training step with float32 products against bfloat16 ones, alternating in one process.

    python scripts/bench_precision.py PATH/TO/tinyshakespeare/input.txt [--steps 120] [override ...]
    python scripts/bench_precision.py --config configs/ptb-word.yaml PATH/TO/ptb [--steps 120] [override ...]

Runs the config (default configs/tinyshakespeare-68s.yaml; a corpus folder means its
ptb.{train,valid,test}.txt) in a temporary folder. After 10 warm-up steps, every block of 5 steps runs the
next of three variants in turn (float32; bfloat16 with the compiled time loops; bfloat16 with the Python
loops, whose per-step products are oneDNN's), so that the machine's stalls fall on all alike; prints the
median step time of each and its ratio to float32's. First, the throughput of torch.mm in both dtypes at the
config's largest shapes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from comparison import machine_line

from lmtrain.config import load_config
from lmtrain.model.language_model import gate_count
from lmtrain.speed import kernels
from lmtrain.training.trainer import Trainer

WARM_UP, BLOCK = 10, 5
VARIANTS = [("float32", True), ("bfloat16", True), ("bfloat16", False)]  # (train.precision, compiled loops)


def gemm_rate(m: int, k: int, n: int, dtype: torch.dtype, repeats: int = 30) -> float:
    """GFLOPS of torch.mm (m, k) @ (k, n) in `dtype`, median of `repeats`."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    times = []
    for _ in range(repeats + 3):
        begin = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - begin)
    return 2 * m * k * n / statistics.median(times[3:]) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tinyshakespeare-68s.yaml")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()  # overrides may come before or after the options
    data = ([f"data.{split}={args.corpus / f'ptb.{split}.txt'}" for split in ("train", "valid", "test")]
            if args.corpus.is_dir() else [f"data.path={args.corpus}"])
    print(machine_line())
    with tempfile.TemporaryDirectory() as folder:
        config = load_config(args.config, [*data, "data.corpus=null", f"train.max_steps={WARM_UP + args.steps}",
                                           "train.max_epochs=null", "train.max_seconds=null", "train.eval_every=100000",
                                           "train.final_samples=0", f"train.out_dir={folder}/run", *args.overrides])
        B, T, H = config.train.batch_size, config.train.bptt, config.model.hidden_size
        G = gate_count(config.model)
        print("\n| torch.mm | float32 GFLOPS | bfloat16 GFLOPS |\n|---|---|---|")
        for shape in [(B, H, G * H), (B * T, H, G * H), (H, B * T, G * H)]:
            rates = [gemm_rate(*shape, dtype) for dtype in (torch.float32, torch.bfloat16)]
            print(f"| ({shape[0]}, {shape[1]}) @ ({shape[1]}, {shape[2]}) | {rates[0]:.0f} | {rates[1]:.0f} |")
        trainer = Trainer(config, resume=False, echo=lambda line: None, warn=print, progress_bar=False)
        step, times, index = trainer._train_step, {v: [] for v in VARIANTS}, 0

        def timed_step(*step_args):
            nonlocal index
            chosen = VARIANTS[(index // BLOCK) % len(VARIANTS)] if index >= WARM_UP else VARIANTS[index % len(VARIANTS)]
            trainer.config.train.precision = chosen[0]
            with kernels.switched(chosen[1]):
                begin = time.perf_counter()
                result = step(*step_args)
                if index >= WARM_UP:
                    times[chosen].append(time.perf_counter() - begin)
            index += 1
            return result

        trainer._train_step = timed_step
        trainer.run()
    model = config.model
    form = ("" if model.cell != "gru" else " (PyTorch's form)" if model.gru_reset == "after"
            else " (the lecture's)" if model.relevance_gate else " (simplified)")
    print(f"\n{model.cell}{form} {model.num_layers}x{H}, batch {B}, bptt {T}, {args.steps} steps in blocks of "
          f"{BLOCK}, {torch.get_num_threads()} threads\n")
    baseline = statistics.median(times[VARIANTS[0]])
    print("| train.precision | time loops | median step (ms) | ratio to float32 |\n|---|---|---|---|")
    for precision, compiled in VARIANTS:
        median = statistics.median(times[(precision, compiled)])
        print(f"| {precision} | {'compiled' if compiled else 'Python'} | {1e3 * median:.1f} | "
              f"{median / baseline:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
