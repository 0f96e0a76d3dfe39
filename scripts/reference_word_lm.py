"""The word-level reference: pytorch/examples' word_language_model (main.py and model.py, LSTM), rebuilt
here with that example's own defaults for everything #7 compares against (no dropout).

    python scripts/reference_word_lm.py PATH/TO/ptb [--epochs N] [--bptt 35] [--threads N]

PATH/TO/ptb holds ptb.train.txt, ptb.valid.txt and ptb.test.txt. As in the example: the vocabulary is
every word of the three files plus `<eos>`, appended at each line end; train reads as 20 streams, validation
as 10; embedding 200, 2x200 `nn.LSTM` (oneDNN's fused kernel), decoder tied to nothing, U(-0.1, 0.1)
embedding and decoder; plain SGD at lr 20 written by hand, gradient norm clipped at 0.25, the state carried
between bptt-35 chunks; the rate divided by 4 after an epoch whose validation loss did not improve.

Prints one JSON line per epoch: training seconds (steps only), tokens/s, validation loss and perplexity.
It imports nothing from lmtrain, so that it measures torch alone (scripts/comparison.py, for its argument
types, imports lmtrain only inside the functions that use it).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from comparison import positive_integer, ptb_folder
from torch import nn


def read_ids(path: Path, vocabulary: dict[str, int]) -> torch.Tensor:
    ids = []
    for line in path.read_text(encoding="utf-8").splitlines():
        for word in line.split() + ["<eos>"]:
            ids.append(vocabulary.setdefault(word, len(vocabulary)))
    return torch.tensor(ids, dtype=torch.long)


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(T, B) time-major streams, as the example keeps them."""
    steps = ids.numel() // batch_size
    return ids[: steps * batch_size].view(batch_size, steps).t().contiguous()


class RNNModel(nn.Module):
    def __init__(self, vocab_size: int, size: int = 200, num_layers: int = 2) -> None:
        super().__init__()
        self.encoder = nn.Embedding(vocab_size, size)
        self.rnn = nn.LSTM(size, size, num_layers)
        self.decoder = nn.Linear(size, vocab_size)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, tokens: torch.Tensor, state):
        output, state = self.rnn(self.encoder(tokens), state)
        return self.decoder(output), state


def detach(state):
    return tuple(tensor.detach() for tensor in state)


@torch.no_grad()
def evaluate(model: RNNModel, data: torch.Tensor, bptt: int) -> float:
    model.eval()
    total, state = 0.0, None
    for start in range(0, data.size(0) - 1, bptt):
        length = min(bptt, data.size(0) - 1 - start)
        logits, state = model(data[start:start + length], state)
        total += length * nn.functional.cross_entropy(logits.flatten(0, 1),
                                                      data[start + 1:start + 1 + length].flatten()).item()
    return total / (data.size(0) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=ptb_folder)
    parser.add_argument("--epochs", type=positive_integer, default=1)
    parser.add_argument("--bptt", type=positive_integer, default=35)
    parser.add_argument("--threads", type=positive_integer, default=None)
    parser.add_argument("--seed", type=int, default=1111)  # the example's default
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    vocabulary: dict[str, int] = {}
    train, valid, _ = (read_ids(args.folder / f"ptb.{split}.txt", vocabulary) for split in ("train", "valid", "test"))
    train_data, valid_data = batchify(train, 20), batchify(valid, 10)
    model, lr, best = RNNModel(len(vocabulary)), 20.0, None
    for epoch in range(1, args.epochs + 1):
        model.train()
        state, seconds, tokens, steps = None, 0.0, 0, 0
        for start in range(0, train_data.size(0) - 1, args.bptt):
            begin = time.perf_counter()
            length = min(args.bptt, train_data.size(0) - 1 - start)
            inputs, targets = train_data[start:start + length], train_data[start + 1:start + 1 + length]
            state = detach(state) if state is not None else None
            model.zero_grad()
            logits, state = model(inputs, state)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            for parameter in model.parameters():
                parameter.data.add_(parameter.grad, alpha=-lr)
            seconds += time.perf_counter() - begin
            tokens, steps = tokens + targets.numel(), steps + 1
        valid_loss = evaluate(model, valid_data, args.bptt)
        print(json.dumps({"epoch": epoch, "steps": steps, "train_seconds": round(seconds, 1),
                          "tokens_per_s": round(tokens / seconds), "valid_loss": round(valid_loss, 4),
                          "valid_perplexity": round(math.exp(valid_loss), 2), "threads": torch.get_num_threads()}),
              flush=True)
        if best is None or valid_loss < best:
            best = valid_loss
        else:
            lr /= 4.0


if __name__ == "__main__":
    main()
