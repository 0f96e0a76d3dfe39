"""One optimizer step on the CPU for three of lmtrain's models, torch's three implementations of Adam
(for-loop, foreach, fused) and SGD, alternating in one process; random gradients, 30 steps each.

    python scripts/bench_optimizer.py

`lmtrain.training.optim.build_optimizer` takes the fused Adam (and plain SGD); this is the measurement behind it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from lmtrain.model.language_model import LanguageModel

MODELS = {  # name -> (vocabulary, embedding, hidden, layers)
    "Tiny Shakespeare 2x256 (configs/tinyshakespeare-char.yaml)": (65, 64, 256, 2),
    "Tiny Shakespeare 1x512 (configs/tinyshakespeare-68s.yaml)": (65, 64, 512, 1),
    "PTB 2x200 (configs/ptb-word.yaml)": (10000, 200, 200, 2),
}
VARIANTS = {"Adam, for-loop": (torch.optim.Adam, {"foreach": False}),
            "Adam, foreach": (torch.optim.Adam, {"foreach": True}),
            "Adam, fused": (torch.optim.Adam, {"fused": True}),
            "SGD": (torch.optim.SGD, {})}
STEPS = 30


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"median of {STEPS} steps, the variants alternating\n")
    print("| model | parameters | " + " | ".join(f"{name} ms" for name in VARIANTS) + " |")
    print("|---|---:|" + "---:|" * len(VARIANTS))
    generator = torch.Generator().manual_seed(0)
    for name, (vocabulary, embedding, hidden, layers) in MODELS.items():
        model = LanguageModel(vocabulary, embed_size=embedding, hidden_size=hidden, num_layers=layers)
        for parameter in model.parameters():
            parameter.grad = torch.randn(parameter.shape, generator=generator)
        optimizers = {label: kind(model.parameters(), lr=1e-3, **options)
                      for label, (kind, options) in VARIANTS.items()}
        times: dict[str, list[float]] = {label: [] for label in VARIANTS}
        for step in range(STEPS + 3):
            for label, optimizer in optimizers.items():
                begin = time.perf_counter()
                optimizer.step()
                if step >= 3:  # the first steps create the optimizer state
                    times[label].append(time.perf_counter() - begin)
        count = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {count:,} | " + " | ".join(f"{1e3 * statistics.median(t):.2f}" for t in times.values())
              + " |")


if __name__ == "__main__":
    main()
