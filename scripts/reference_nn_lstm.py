"""The reference that lmtrain's speed and quality are measured against: a plain PyTorch character-level
LSTM language model on `torch.nn.LSTM` (oneDNN's fused kernel on CPU, cuDNN on GPU), written the way
pytorch/examples' word_language_model and char-rnn do it, with lmtrain's Tiny Shakespeare settings.

    python scripts/reference_nn_lstm.py PATH/TO/input.txt [--steps N | --seconds S] [--eval]

Settings (those of configs/tinyshakespeare-char.yaml): first 90% of the file trains, the last 10%
validates (cut at the line end nearest 90%, as lmtrain does); embedding 64, 2x256 LSTM, batch 32
streams, bptt 64 with the state carried between chunks, Adam lr 2e-3, gradient norm clipped at 5.
Prints one JSON line: steps, training seconds (steps only, no evaluation), tokens/s, and with `--eval`
the validation loss in nats per character over the whole split, read as 32 streams with the state
carried throughout (`valid_loss`; lmtrain's evaluation restarts the state every 2048 tokens instead).
It imports nothing from lmtrain, so that it measures torch alone (scripts/comparison.py, for its argument
types, imports lmtrain only inside the functions that use it).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from comparison import positive_integer, positive_number, text_file
from torch import nn


class CharLSTM(nn.Module):
    def __init__(self, vocab_size: int, embed_size: int = 64, hidden_size: int = 256, num_layers: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.lstm = nn.LSTM(embed_size, hidden_size, num_layers, batch_first=True)
        self.projection = nn.Linear(hidden_size, vocab_size)

    def forward(self, tokens: torch.Tensor, state=None):
        outputs, state = self.lstm(self.embedding(tokens), state)
        return self.projection(outputs), state


def split_text(text: str, fraction: float = 0.9) -> tuple[str, str]:
    """First `fraction` for training, the rest for validation, cut after the line holding the 90% point."""
    cut = text.find("\n", round(fraction * len(text)) - 1) + 1 or len(text)
    return text[:cut], text[cut:]


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    columns = ids.numel() // batch_size
    return ids[: columns * batch_size].view(batch_size, columns)


def detach(state):
    return tuple(tensor.detach() for tensor in state)


@torch.no_grad()
def validation_loss(model: CharLSTM, data: torch.Tensor, bptt: int) -> float:
    model.eval()
    total, count, state = 0.0, 0, None
    for start in range(0, data.size(1) - 1, bptt):
        inputs, targets = data[:, start:start + bptt], data[:, start + 1:start + 1 + bptt]
        inputs = inputs[:, : targets.size(1)]
        logits, state = model(inputs, state)
        total += nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
    model.train()
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", type=text_file)
    parser.add_argument("--steps", type=positive_integer, default=None)
    parser.add_argument("--seconds", type=positive_number, default=None, help="training time budget (steps only)")
    parser.add_argument("--eval", action="store_true", help="report the validation loss at the end")
    parser.add_argument("--batch-size", type=positive_integer, default=32)
    parser.add_argument("--bptt", type=positive_integer, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.steps is None and args.seconds is None:
        parser.error("give --steps or --seconds")
    torch.manual_seed(args.seed)
    train_text, valid_text = split_text(args.corpus.read_text(encoding="utf-8"))
    vocabulary = sorted(set(train_text))
    index = {char: i for i, char in enumerate(vocabulary)}
    encode = lambda text: torch.tensor([index.get(char, 0) for char in text], dtype=torch.long)  # noqa: E731
    train_data, valid_data = (batchify(encode(train_text), args.batch_size),
                              batchify(encode(valid_text), args.batch_size))
    model = CharLSTM(len(vocabulary))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps, seconds, tokens, state, start = 0, 0.0, 0, None, 0
    while (args.steps is None or steps < args.steps) and (args.seconds is None or seconds < args.seconds):
        begin = time.perf_counter()
        if start + 1 >= train_data.size(1):
            start, state = 0, None
        inputs = train_data[:, start:start + args.bptt]
        targets = train_data[:, start + 1:start + 1 + args.bptt]
        inputs, start = inputs[:, : targets.size(1)], start + args.bptt
        logits, state = model(inputs, None if state is None else detach(state))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        steps, tokens = steps + 1, tokens + targets.numel()
        seconds += time.perf_counter() - begin
    result = {"steps": steps, "train_seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.eval:
        result["valid_loss"] = round(validation_loss(model, valid_data, args.bptt), 4)
        result["valid_bits_per_char"] = round(result["valid_loss"] / math.log(2), 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
