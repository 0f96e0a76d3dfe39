"""Train the quickstart twice, with autograd's and with the hand-written backward, and compare.

    python scripts/compare_backward.py [--steps 5000] [--out-dir runs/compare-backward]

Same config, seed and data order; only `model.backward` differs. Prints a markdown table (validation
loss, test perplexity, training time and tokens/s) to paste into docs/backprop.md.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch

from lmtrain.config import load_config
from lmtrain.evaluate import evaluate_checkpoint
from lmtrain.train import train

ROOT = Path(__file__).resolve().parent.parent
MALLOC = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--out-dir", type=Path, default=Path("runs/compare-backward"))
    args = parser.parse_args()
    rows = []
    for backward in ("autograd", "manual"):
        out_dir = args.out_dir / backward
        config = load_config(ROOT / "configs" / "quickstart.yaml",
                             [f"model.backward={backward}", f"train.max_steps={args.steps}",
                              f"train.out_dir={out_dir}", "train.final_samples=0"])
        result = train(config, echo=print, progress_bar=False)
        test, _ = evaluate_checkpoint(str(out_dir / "best.pt"), split="test")
        seconds = result.progress.train_seconds
        rows.append(f"| {backward} | {result.progress.best_valid_loss:.4f} | {test['perplexity']:.3f} | "
                    f"{seconds:.0f} s | {result.progress.tokens / seconds:,.0f} |")
    allocator = ", ".join(f"{name}={os.environ[name]}" for name in MALLOC if name in os.environ) or "glibc defaults"
    print(f"\n`python scripts/compare_backward.py --steps {args.steps}` on {platform.machine()}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, allocator: {allocator}\n")
    print("| model.backward | best valid loss | test perplexity | training time | tokens/s |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
