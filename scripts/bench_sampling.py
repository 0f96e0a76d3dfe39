"""Sampling speed: a batch of samples drawn side by side from a 2x512 LSTM, the state carried from
token to token (the prefix is never run again), as `lmtrain sample` does.

    python scripts/bench_sampling.py [--num 16] [--tokens 200] [--vocab 65] [--repeats 5] [--device cpu] [--doc FILE]

The model is untrained (random weights, vocabulary 65 like Tiny Shakespeare's characters; `--vocab 10000`
is a word-level vocabulary the size of Penn Treebank's) and
`<eos>` is never drawn (its output bias is -1e9), so every sample runs the full `--tokens`: the time
per token does not depend on the weights. Prints the median tokens/s over `--repeats` runs (and with
`--doc` writes them as the section "Sampling" of that file).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from contextlib import nullcontext

import torch
from comparison import allocator_settings, cpu_name, doc_file, integer_at_least, positive_integer
from doc_sections import write_section

from lmtrain.data.tokenizer import Tokenizer
from lmtrain.evaluation.sampling import generate
from lmtrain.model.language_model import LanguageModel
from lmtrain.speed import kernels

FORWARD = "model's forward"


def never_ending_model(tokenizer: Tokenizer, device: str = "cpu") -> LanguageModel:
    """The untrained 2x512 LSTM (seed 0) whose <eos> is never drawn: its output bias is -1e9, a finite
    floor (sampling refuses non-finite logits as a damaged model's)."""
    torch.manual_seed(0)
    model = LanguageModel(tokenizer.vocab_size, cell="lstm", embed_size=64, hidden_size=512, num_layers=2,
                          gradients="manual").to(device)
    with torch.no_grad():
        model.projection.bias[tokenizer.eos_id] = -1e9
    return model


def vocabulary(size: int) -> Tokenizer:
    """65 tokens: Tiny Shakespeare's characters' count; any other size: that many words."""
    if size == 65:
        return Tokenizer.fit("".join(chr(c) for c in range(32, 95)) + "\n", level="char")
    return Tokenizer.fit(" ".join(f"w{i}" for i in range(size - 2)) + "\n", level="word")


def tokens_per_s(model: LanguageModel, tokenizer: Tokenizer, num: int, tokens: int,
                 generator: torch.Generator) -> float:
    """Tokens/s of one `generate` call of `num` samples of `tokens` tokens each, side by side."""
    begin = time.perf_counter()
    samples = generate(model, tokenizer, num=num, max_tokens=tokens, sentence_start=False, generator=generator)
    seconds = time.perf_counter() - begin
    # A sample's tokens: its characters, or its words (a word-level sample is the words joined by spaces).
    return sum(len(sample) if tokenizer.level == "char" else len(sample.split()) for sample in samples) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=positive_integer, default=16)
    parser.add_argument("--tokens", type=positive_integer, default=200)
    parser.add_argument("--vocab", type=integer_at_least(3, "<unk>, <eos> and one word"), default=65,
                        help="the vocabulary's size, <unk> and <eos> included")
    parser.add_argument("--repeats", type=positive_integer, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--doc", type=doc_file, default=None)
    args = parser.parse_args()
    tokenizer = vocabulary(args.vocab)
    model = never_ending_model(tokenizer, args.device)
    generator = torch.Generator(device=args.device).manual_seed(0)
    # The compiled step (where the kernels run) against the model's own forward, alternating.
    ways = {"compiled step": nullcontext, FORWARD: lambda: kernels.switched(False)}
    speeds: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(args.repeats + 1):  # the first round warms up
        for way, context in ways.items():
            with context():
                speeds[way].append(tokens_per_s(model, tokenizer, args.num, args.tokens, generator))
    speeds = {way: values[1:] for way, values in speeds.items()}
    median = {way: statistics.median(values) for way, values in speeds.items()}
    step = "compiled step" if model.token_step() is not None else "model's forward (the kernels do not run here)"
    lines = [f"`python scripts/bench_sampling.py {shlex.join(sys.argv[1:])}`".replace(" `", "`"), "",
             f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} "
             f"threads, allocator: {allocator_settings()}, device {args.device}: 2x512 LSTM, vocabulary "
             f"{tokenizer.vocab_size}, {args.num} samples x {args.tokens} tokens side by side, the state carried "
             f"from token to token (`lmtrain.evaluation.sampling.generate`): **median "
             f"{median['compiled step']:,.0f} tokens/s** with the {step} (runs: "
             f"{', '.join(f'{s:,.0f}' for s in speeds['compiled step'])}); each token through the model's own "
             f"forward, alternating: {median[FORWARD]:,.0f} (runs: "
             f"{', '.join(f'{s:,.0f}' for s in speeds[FORWARD])})."]
    print("\n".join(lines))
    if args.doc:
        write_section(args.doc, "Sampling" + (" on a GPU" if args.device == "cuda" else ""), "\n".join(lines))


if __name__ == "__main__":
    main()
