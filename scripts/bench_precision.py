"""`train.precision`: a training step with float32 products against bfloat16 ones, alternating in one process.

    python scripts/bench_precision.py PATH/TO/tinyshakespeare/input.txt [--steps 120] [override ...]
    python scripts/bench_precision.py --config configs/ptb-word.yaml PATH/TO/ptb [--steps 120] [override ...]

Runs the config (default configs/tinyshakespeare-68s.yaml; a corpus folder means its
ptb.{train,valid,test}.txt) in a temporary folder. After 10 warm-up steps, every block of 5 steps runs the
next of three variants in turn (float32; bfloat16 with the compiled time loops; bfloat16 with the Python
loops, whose per-step products are oneDNN's), so that the machine's stalls fall on all alike; prints the
median step time of each and its ratio to float32's. `--steps` is at least 11, so that each variant gets a
block. The table's "time loops" column says what ran: "Python" and why where the compiled loops cannot
run (kernels not built), and where they cannot make bfloat16 products (a CPU without AVX-512 BF16, an odd
hidden size) that their per-step products were float32.
First, the throughput of torch.mm in both dtypes at the config's largest shapes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch
from comparison import ROOT, checked_config, corpus, corpus_settings, integer_at_least, machine_line

from lmtrain.model.language_model import gate_count
from lmtrain.speed import kernels
from lmtrain.speed.route import Route
from lmtrain.training.trainer import Trainer

WARM_UP, BLOCK = 10, 5
VARIANTS = [("float32", True), ("bfloat16", True), ("bfloat16", False)]  # (train.precision, compiled loops)


def variant_at(index: int) -> tuple[str, bool]:
    """The variant training step `index` runs: each in turn during the warm-up, then a block of BLOCK each."""
    return VARIANTS[(index // BLOCK) % len(VARIANTS)] if index >= WARM_UP else VARIANTS[index % len(VARIANTS)]


# The fewest timed steps in which every variant runs (fewer leave one without a step time): the blocks
# start at multiples of BLOCK, WARM_UP among them, so the last variant's first step is this many in.
MIN_STEPS = (len(VARIANTS) - 1) * BLOCK + 1


def time_loops(precision: str, compiled: bool, steps: int, hidden_size: int) -> str:
    """What a variant's layers ran, as lmtrain's route decides it (`Route.time_loops`,
    `Route.bfloat16_loops`): "compiled"; "compiled, float32 per-step products" with the reason where
    bfloat16 was asked and the compiled loops cannot make it; or "Python" with the reason where the
    variant asked for the compiled loops and they cannot run."""
    if not compiled:
        return "Python"
    module = kernels.load(announce=lambda line: None)
    route = Route(loops=module, product_dtype=torch.bfloat16 if precision == "bfloat16" else None)
    if route.time_loops(steps) is None:
        reason = (f"the compiled kernels are not available: {kernels.unavailable_reason()}" if module is None
                  else f"sequences of {steps} steps are too short for them")
        return f"Python ({reason})"
    if route.mixed and not route.bfloat16_loops(hidden_size):
        return f"compiled, float32 per-step products ({kernels.bfloat16_obstacle(module, hidden_size)})"
    return "compiled"


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
    parser.add_argument("--config", default=ROOT / "configs" / "tinyshakespeare-68s.yaml")
    parser.add_argument("--steps", type=integer_at_least(MIN_STEPS, f"each variant runs a block of {BLOCK}"),
                        default=120, help=f"timed steps after the warm-up, {MIN_STEPS} or more")
    parser.add_argument("corpus", type=corpus)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()  # overrides may come before or after the options
    with tempfile.TemporaryDirectory() as folder:
        config = checked_config(parser, args.config, [
            *corpus_settings(args.corpus), f"train.max_steps={WARM_UP + args.steps}", "train.max_epochs=null",
            "train.max_seconds=null", "train.eval_every=100000", "train.final_samples=0",
            f"train.out_dir={folder}/run", *args.overrides])
        print(machine_line())
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
            chosen = variant_at(index)
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
        print(f"| {precision} | {time_loops(precision, compiled, T, H)} | {1e3 * median:.1f} | "
              f"{median / baseline:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
