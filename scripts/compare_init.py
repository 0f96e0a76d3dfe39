"""How fast lmtrain's LSTM learns per step under each initialisation, against the reference `nn.LSTM`
model, on the same Tiny Shakespeare batches.

    python scripts/compare_init.py PATH/TO/tinyshakespeare/input.txt [--steps 300] [--threads 1]

Every model sees the same 32 x 64-character chunks of the training split in the same order, with the
state carried, Adam lr 2e-3 and the gradient norm clipped at 5 (scripts/reference_nn_lstm.py's
settings), and starts from seed 0. Prints the mean training loss over each 50 steps, and a Markdown
table. lmtrain variants: `model.init` zaremba or torch, `model.forget_bias` 1 or null.
"""

from __future__ import annotations

import argparse

import torch
from comparison import integer_at_least, positive_integer, text_file
from reference_nn_lstm import CharLSTM, batchify, split_text
from torch import nn

from lmtrain.model.language_model import LanguageModel

VARIANTS = {"reference nn.LSTM": None,
            "lmtrain, init zaremba, forget_bias 1 (the defaults)": dict(init="zaremba", forget_bias=1.0),
            "lmtrain, init torch, forget_bias 1": dict(init="torch", forget_bias=1.0),
            "lmtrain, init torch, forget_bias null": dict(init="torch", forget_bias=None)}
EVERY = 50


def build(options: dict | None, vocab_size: int) -> nn.Module:
    torch.manual_seed(0)
    if options is None:
        return CharLSTM(vocab_size)
    return LanguageModel(vocab_size, embed_size=64, hidden_size=256, num_layers=2, gradients="manual", **options)


def detach(state):
    if state is None:
        return None
    return [tuple(t.detach() for t in layer) for layer in state] if isinstance(state, list) else tuple(
        t.detach() for t in state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=text_file, help="Tiny Shakespeare's input.txt")
    parser.add_argument("--steps", type=integer_at_least(EVERY, f"the table's rows are means over {EVERY}"),
                        default=300)
    parser.add_argument("--threads", type=positive_integer, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_text, _ = split_text(args.corpus.read_text(encoding="utf-8"))
    vocabulary = {char: index for index, char in enumerate(sorted(set(train_text)))}
    data = batchify(torch.tensor([vocabulary[char] for char in train_text]), 32)
    if data.size(1) <= 65:  # each step reads 65 characters of each of the 32 streams
        parser.error(f"{args.corpus}: too short, its training split is {len(train_text):,} characters; "
                     f"32 streams of 66 need {32 * 66:,}")
    models = {name: build(options, len(vocabulary)) for name, options in VARIANTS.items()}
    optimizers = {name: torch.optim.Adam(model.parameters(), lr=2e-3) for name, model in models.items()}
    states, sums, rows = dict.fromkeys(models), dict.fromkeys(models, 0.0), []
    for step in range(args.steps):
        start = (step * 64) % (data.size(1) - 65)
        inputs, targets = data[:, start:start + 64], data[:, start + 1:start + 65]
        for name, model in models.items():
            logits, states[name] = model(inputs, detach(states[name]))
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizers[name].step()
            sums[name] += loss.item()
        if (step + 1) % EVERY == 0:
            rows.append((step + 1, {name: total / EVERY for name, total in sums.items()}))
            print(step + 1, {name: round(value, 3) for name, value in rows[-1][1].items()}, flush=True)
            sums = dict.fromkeys(models, 0.0)
    print("\n| model | " + " | ".join(f"steps {step - EVERY + 1}-{step}" for step, _ in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for name in models:
        print(f"| {name} | " + " | ".join(f"{losses[name]:.3f}" for _, losses in rows) + " |")


if __name__ == "__main__":
    main()
