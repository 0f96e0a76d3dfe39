"""What a sampling step costs, and how much of it is arithmetic: `generate` on the 2x512 LSTM of
scripts/bench_sampling.py (its compiled step where the kernels run) against a bare loop that runs the same
LSTM equations in torch with its weights packed for oneDNN once per call and no autograd Function around them.

    python scripts/profile_sampling.py [--num 16 1] [--tokens 200] [--repeats 5]

Prints, for each number of rows: tokens/s of `generate` and of the bare loop (medians, alternating), and
the time of one recurrent product, (rows, 512) by (512, 2,048), as oneDNN's linear with the weight as it
is (what a single step gets) and packed for that many rows (what a sequence gets). Then the compiled
step's parts (`LanguageModel.token_step`): packing the weights, the whole step, each layer's call with
its GFLOP/s and GB/s of weights read, and the draw (`sample_next`), in microseconds (medians). Last, the draw
against torch.multinomial's at vocabularies of 65 and 10,000 tokens. The bare loop is a
measuring stick, not a sampler lmtrain offers: it shows the floor that Python and torch's per-call cost
leave at one token a step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_sampling import never_ending_model, vocabulary
from comparison import allocator_settings, cpu_name, positive_integer

from lmtrain.evaluation.sampling import generate, sample_next
from lmtrain.model.language_model import LanguageModel
from lmtrain.speed.torch_internals import ONEDNN_LINEAR

H, E = 512, 64


@torch.no_grad()
def bare_loop(model: LanguageModel, num: int, tokens: int, eos_id: int, generator: torch.Generator) -> None:
    """The LSTM equations a token at a time, each layer's weights packed once for `num` rows."""
    onednn = ONEDNN_LINEAR
    layers = []
    for layer in model.rnn.layers:
        W_recurrent, W_input, b = layer.cell.stacked_weights()
        layers.append((onednn.pack(W_input, num), onednn.pack(W_recurrent, num), b))
    state = [(torch.zeros(num, H), torch.zeros(num, H)) for _ in layers]
    token = torch.full((num,), eos_id)
    for _ in range(tokens):
        x = model.embed(token)
        for i, (W_input, W_recurrent, b) in enumerate(layers):
            a_prev, c_prev = state[i]
            z = onednn.plus(a_prev, W_recurrent, onednn(x, W_input, b))
            z_f, z_u, z_c, z_o = z.chunk(4, dim=1)
            c = torch.sigmoid(z_f) * c_prev + torch.sigmoid(z_u) * torch.tanh(z_c)
            x = torch.sigmoid(z_o) * torch.tanh(c)
            state[i] = (x, c)
        logits = model.projection(x)
        token = sample_next(logits, generator=generator)


def product_us(rows: int, repeats: int = 200) -> tuple[float, float]:
    """Microseconds of (rows, H) by (H, 4H) through oneDNN's linear: weight as it is, and packed."""
    onednn = ONEDNN_LINEAR
    x, W = torch.randn(rows, H), torch.randn(4 * H, H)
    results = []
    for weight in (W, onednn.pack(W, rows)):
        for _ in range(20):
            onednn(x, weight)
        begin = time.perf_counter()
        for _ in range(repeats):
            onednn(x, weight)
        results.append((time.perf_counter() - begin) / repeats * 1e6)
    return results[0], results[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=positive_integer, nargs="+", default=[16, 1])
    parser.add_argument("--tokens", type=positive_integer, default=200)
    parser.add_argument("--repeats", type=positive_integer, default=5)
    args = parser.parse_args()
    if ONEDNN_LINEAR is None:
        raise SystemExit("this torch has no oneDNN linear to measure")
    tokenizer = vocabulary(65)
    model = never_ending_model(tokenizer).eval()
    print(f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, allocator: "
          f"{allocator_settings()}; 2x{H} LSTM, {args.tokens} tokens a row, medians of {args.repeats}\n")
    print("| rows | generate tokens/s | bare loop tokens/s | product, weight as it is (us) | product, packed (us) |")
    print("|---:|---:|---:|---:|---:|")
    for num in args.num:
        generator = torch.Generator().manual_seed(0)
        runs = {"generate": lambda: generate(model, tokenizer, num=num, max_tokens=args.tokens,
                                             sentence_start=False, generator=generator),
                "bare": lambda: bare_loop(model, num, args.tokens, tokenizer.eos_id, generator)}
        speeds: dict[str, list[float]] = {name: [] for name in runs}
        for run in runs.values():
            run()
        for _ in range(args.repeats):
            for name, run in runs.items():
                begin = time.perf_counter()
                run()
                speeds[name].append(num * args.tokens / (time.perf_counter() - begin))
        plain, packed = product_us(num)
        print(f"| {num} | {statistics.median(speeds['generate']):,.0f} | {statistics.median(speeds['bare']):,.0f} | "
              f"{plain:.0f} | {packed:.0f} |", flush=True)
    print("\n| rows | packing (ms) | compiled step (us) | layer 1 call (us) | layer 2 call (us) | draw (us) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for num in args.num:
        print(step_parts(model, num), flush=True)
    print("\n| rows | vocabulary | draw, sample_next (us) | torch.multinomial of the softmax (us) | ratio |")
    print("|---:|---:|---:|---:|---:|")
    for num in args.num:
        for size in (65, 10_000):
            print(draw_against_multinomial(num, size), flush=True)


def median_us(function, repeats: int = 300) -> float:
    for _ in range(20):
        function()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        function()
        times.append(time.perf_counter() - begin)
    return statistics.median(times) * 1e6


@torch.no_grad()
def step_parts(model: LanguageModel, rows: int) -> str:
    """A markdown row: the compiled step's parts at `rows` rows."""
    begin = time.perf_counter()
    step = model.token_step()
    pack_ms = (time.perf_counter() - begin) * 1e3
    if step is None:
        return f"| {rows} | the compiled kernels do not run here | | | | |"
    state = [tuple(torch.zeros(rows, H) for _ in layer) for layer in model.initial_state(rows)]
    tokens = torch.randint(0, model.embedding.num_embeddings, (rows,))
    whole = median_us(lambda: step(tokens, state))
    layers = []
    for index, (_, packed, b, _) in enumerate(step.layers):
        x = torch.randn(rows, E if index == 0 else H)
        a, c = torch.randn(rows, H), torch.randn(rows, H)
        us = median_us(lambda: step.loops.lstm_token_step(packed, b, a, x, c))
        flops, weight_bytes = 2 * rows * packed.numel(), 4 * packed.numel()
        layers.append(f"{us:.0f} ({flops / us / 1e3:.0f} GFLOP/s, {weight_bytes / us / 1e3:.0f} GB/s)")
    logits, generator = torch.randn(rows, model.embedding.num_embeddings), torch.Generator().manual_seed(0)
    draw = median_us(lambda: sample_next(logits, generator=generator))
    return f"| {rows} | {pack_ms:.1f} | {whole:.0f} | {' | '.join(layers)} | {draw:.0f} |"


def draw_against_multinomial(rows: int, size: int) -> str:
    """A markdown row: one draw a row from (rows, size) logits by `sample_next` (the inverse distribution
    function) and by torch.multinomial (the exponential race, one random number a token), alternating."""
    logits, generator = torch.randn(rows, size), torch.Generator().manual_seed(0)
    draws = {"sample_next": lambda: sample_next(logits, generator=generator),
             "multinomial": lambda: torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)}
    times: dict[str, list[float]] = {name: [] for name in draws}
    for _ in range(5):
        for name, draw in draws.items():
            times[name].append(median_us(draw, repeats=60))
    ours, theirs = (statistics.median(times[name]) for name in draws)
    return f"| {rows} | {size:,} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.2f}x |"


if __name__ == "__main__":
    main()
