"""Sampling speed: a batch of samples drawn side by side from a 2x512 LSTM, the state carried from
token to token (the prefix is never run again), as `lmtrain sample` does.

    python scripts/bench_sampling.py [--num 16] [--tokens 200] [--repeats 5] [--device cpu] [--doc FILE]

The model is untrained (random weights, vocabulary 65 like Tiny Shakespeare's characters) and
`<eos>` is never drawn (its logit is masked), so every sample runs the full `--tokens`: the time
per token does not depend on the weights. Prints the median tokens/s over `--repeats` runs (and with
`--doc` writes them as the section "Sampling" of that file).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from comparison import allocator_settings, cpu_name
from doc_sections import write_section

from lmtrain.data.tokenizer import Tokenizer
from lmtrain.evaluation.sampling import generate
from lmtrain.model.language_model import LanguageModel


class NeverEnds(LanguageModel):
    """The model with `<eos>` made impossible, so that every sample has the same length."""

    def forward(self, tokens, state=None, *, right_to_left=False):
        logits, state = super().forward(tokens, state, right_to_left=right_to_left)
        # EOS = 1; a finite floor, since sampling refuses non-finite logits as a damaged model's
        logits[..., 1] = -1e9
        return logits, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--doc", type=Path, default=None)
    args = parser.parse_args()
    tokenizer = Tokenizer.fit("".join(chr(c) for c in range(32, 95)) + "\n", level="char")
    torch.manual_seed(0)
    model = NeverEnds(tokenizer.vocab_size, cell="lstm", embed_size=64, hidden_size=512, num_layers=2,
                      gradients="manual").to(args.device)
    generator = torch.Generator(device=args.device).manual_seed(0)
    run = lambda: generate(model, tokenizer, num=args.num, max_tokens=args.tokens,  # noqa: E731
                           sentence_start=False, generator=generator)
    run()  # warm-up
    speeds = []
    for _ in range(args.repeats):
        begin = time.perf_counter()
        samples = run()
        speeds.append(sum(len(sample) for sample in samples) / (time.perf_counter() - begin))
    allocator = allocator_settings()
    lines = [f"`python scripts/bench_sampling.py {' '.join(sys.argv[1:])}`".replace(" `", "`"), "",
             f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} "
             f"threads, allocator: {allocator}, device {args.device}: 2x512 LSTM, vocabulary {tokenizer.vocab_size}, "
             f"{args.num} samples x {args.tokens} tokens side by side: **median {statistics.median(speeds):,.0f} "
             f"tokens/s** (runs: {', '.join(f'{s:,.0f}' for s in speeds)}). The state is carried from token "
             f"to token (`lmtrain.evaluation.sampling.generate`); the prefix never runs again."]
    print("\n".join(lines))
    if args.doc:
        write_section(args.doc, "Sampling" + (" on a GPU" if args.device == "cuda" else ""), "\n".join(lines))

if __name__ == "__main__":
    main()
