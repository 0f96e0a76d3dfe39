"""Train the quickstart twice, with autograd's and with the hand-written backward, and compare.

    python scripts/compare_backward.py [--config configs/quickstart.yaml] [--steps 5000] [KEY=VALUE ...]

Same config, seed and data order; only `model.gradients` differs (extra KEY=VALUE overrides go to both). Prints a
markdown table (validation loss, test perplexity, training time and tokens/s) to paste into docs/backprop.md.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
from pathlib import Path

import torch
from comparison import allocator_settings, checked_config, positive_integer

from lmtrain.errors import LmtrainError
from lmtrain.evaluation.perplexity import evaluate_checkpoint
from lmtrain.training.trainer import train

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "quickstart.yaml")
    parser.add_argument("--steps", type=positive_integer, default=5000)
    parser.add_argument("--out-dir", type=Path, default=Path("runs/compare-backward"))
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE for both runs, e.g. data.path=...")
    args = parser.parse_intermixed_args()  # overrides may come before or after the options
    configs = {backward: checked_config(parser, args.config, [
        *args.overrides, f"model.gradients={backward}", f"train.max_steps={args.steps}",
        f"train.out_dir={args.out_dir / backward}", "train.final_samples=0"]) for backward in ("autograd", "manual")}
    rows = []
    for backward, config in configs.items():
        out_dir = args.out_dir / backward
        result = train(config, echo=print, progress_bar=False)
        try:
            test, _ = evaluate_checkpoint(str(out_dir / "best.pt"), split="test")
        except LmtrainError:  # a corpus cut in two has no test split
            test, _ = evaluate_checkpoint(str(out_dir / "best.pt"), split="valid")
        seconds = result.progress.train_seconds
        rows.append(f"| {backward} | {result.progress.best_valid_loss:.4f} | {test['perplexity']:.3f} | "
                    f"{seconds:.0f} s | {result.progress.tokens / seconds:,.0f} |")
    allocator = allocator_settings()
    print(f"\n`python scripts/compare_backward.py {shlex.join(sys.argv[1:])}` on {platform.machine()}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, allocator: {allocator}\n")
    print("| model.gradients | best valid loss | test (else valid) perplexity | training time | tokens/s |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
