"""From corpus files to batches of token ids. Knows tokens, not models.

Two ways to read a corpus (`data.mode`):

- stream: the split is one token stream (`<eos>` between lines) cut into B parallel streams and read
  in chunks of `bptt` steps; the recurrent state is carried from one chunk to the next (truncated
  backpropagation through time).
- sentences: every line is its own sequence, the lecture's set-up: it starts from a(0) = 0 with the
  input x(1) = 0 and ends by predicting `<eos>`; lines are batched with padding, and padded targets
  are left out of the loss. A line longer than `bptt` tokens is cut into pieces of at most `bptt`.

Targets are always the inputs shifted by one step: the model predicts token t+1 from tokens <= t.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmtrain.config import DATA_PATHS, Config, get_value
from lmtrain.data.encoding import stream_ids
from lmtrain.data.tokenizer import ZERO_INPUT, Tokenizer, file_kind, split_lines
from lmtrain.errors import LmtrainError

IGNORE = -100  # target id left out of the loss (torch's cross_entropy default ignore_index)

InputsTargets = tuple[Tensor, Tensor]  # (inputs (T,), targets (T,))


def reverse_text(text: str, *, level: str, eos: str = "line") -> str:
    """The text read right to left, for the right-to-left LM of `model.direction: bi`: the lines in reverse
    order, the tokens of each line reversed. Its id stream is the forward stream flipped, and each
    reversed line still ends in `<eos>`:  "a b\nc d\n" -> "d c\nb a\n"."""
    if eos == "none":
        return text[::-1] if level == "char" else " ".join(reversed(text.split()))
    flip = (lambda line: line[::-1]) if level == "char" else (lambda line: " ".join(reversed(line.split())))
    return "".join(flip(line) + "\n" for line in reversed(split_lines(text)))


def reversed_stream(ids: Tensor, *, eos: str) -> Tensor:
    """The id stream of `reverse_text(text)` from the stream of `text` (as `stream_ids` makes them),
    without the text: with `eos == "line"` the stream flipped (it starts and ends with `<eos>`);
    with "none", the leading `<eos>` stays first and the rest is flipped. int32, a new tensor."""
    ids = ids.int()  # flip has no kernel for uint16 / uint32
    return ids.flip(0) if eos == "line" else torch.cat([ids[:1], ids[1:].flip(0)])


def batchify(ids: Tensor, batch_size: int) -> Tensor:
    """Cut a stream into `batch_size` contiguous rows, dropping the remainder:

        ids = a b c d e f g h i j k l m n o p q r s t u v w x y z, batch_size = 4

        ┌ a b c d e f ┐   row 0 continues into ...
        │ g h i j k l │   row 1, ... ; each row is read left to right in
        │ m n o p q r │   chunks of bptt columns, the state carried from
        └ s t u v w x ┘   one chunk to the next (y z dropped)
    """
    columns = ids.numel() // batch_size
    if columns < 2:
        raise LmtrainError(f"the training split has {ids.numel()} tokens: too few for train.batch_size "
                           f"{batch_size} (each of the {batch_size} streams needs at least 2)")
    return ids[: columns * batch_size].view(batch_size, columns)


def num_chunks(data: Tensor, bptt: int) -> int:
    """Chunks in one pass over batchified `data` (the last may be shorter than `bptt`)."""
    return -(-(data.size(1) - 1) // bptt)


def get_chunk(data: Tensor, index: int, bptt: int) -> InputsTargets:
    """Chunk `index` of batchified data: inputs (B, T) and the targets, the next column over:

        data    a b c d e f g       bptt = 3, index 1
        inputs        d e f
        targets         e f g
    """
    start = index * bptt
    length = min(bptt, data.size(1) - 1 - start)
    return data[:, start:start + length], data[:, start + 1:start + 1 + length]


def shard_rows(rows: int, *, rank: int, world_size: int) -> slice:
    """The rows of a global batch that process `rank` of `world_size` trains on (`lmtrain.training.distributed`):
    a contiguous share, as even as `rows` allows. A stream row is a contiguous piece of the corpus, so
    each process reads contiguous pieces too, and carries the state of its own rows:

        batchify(ids, 4), world_size 2
        ┌ a b c d e f ┐   rank 0
        │ g h i j k l │   rank 0
        │ m n o p q r │   rank 1
        └ s t u v w x ┘   rank 1
    """
    return slice(rank * rows // world_size, (rank + 1) * rows // world_size)


def shard_batch(batch: InputsTargets, *, rank: int, world_size: int) -> InputsTargets:
    """Process `rank`'s rows of a global (inputs, targets) batch, less the columns that are padding in
    all of them. A process left with no row (the last sentences batch of an epoch may hold fewer than
    `world_size`) gets one padding row: no loss, but its backward pass runs, as DDP needs of all."""
    inputs, targets = (tensor[shard_rows(tensor.size(0), rank=rank, world_size=world_size)] for tensor in batch)
    real_columns = (targets != IGNORE).any(dim=0).nonzero()
    if real_columns.numel() == 0:
        return torch.full((1, 1), ZERO_INPUT, dtype=inputs.dtype), torch.full((1, 1), IGNORE, dtype=targets.dtype)
    length = int(real_columns[-1]) + 1
    return inputs[:, :length], targets[:, :length]


def sentence_pieces(tokenizer: Tokenizer, text: str, max_length: int) -> list[InputsTargets]:
    """Every non-empty line as a sequence from x(1) = 0 to `<eos>`, cut into pieces of at most
    `max_length` steps (a later piece starts from a zero state with its preceding token as input):

        line "the cat sat"  ->  inputs  0   the cat sat
                                targets the cat sat <eos>
    """
    pieces = []
    for line in tokenizer.encode_lines(text):
        if len(line) < 2:  # an empty line is only <eos>: it holds no sentence
            continue
        inputs = torch.tensor([ZERO_INPUT, *line[:-1]], dtype=torch.long)
        targets = torch.tensor(line, dtype=torch.long)
        pieces.extend(zip(inputs.split(max_length), targets.split(max_length)))
    return pieces


def stream_segments(ids: Tensor, segment_length: int) -> list[InputsTargets]:
    """An id stream as consecutive segments whose targets cover every token after the first exactly
    once; evaluation reads each from a zero state. Fixed by `segment_length`, not by the batch size,
    so the loss does not depend on how many segments run side by side."""
    if ids.numel() < 2:
        return []
    inputs, targets = ids[:-1], ids[1:]
    return list(zip(inputs.split(segment_length), targets.split(segment_length)))


def pad_batch(sequences: list[InputsTargets]) -> InputsTargets:
    """Right-pad sequences to one length: inputs with ZERO_INPUT, targets with IGNORE. Padding comes
    after a sequence's end, so it cannot change the outputs at real positions."""
    length = max(inputs.numel() for inputs, _ in sequences)
    inputs = torch.full((len(sequences), length), ZERO_INPUT, dtype=torch.long)
    targets = torch.full((len(sequences), length), IGNORE, dtype=torch.long)
    for row, (sequence_inputs, sequence_targets) in enumerate(sequences):
        inputs[row, : sequence_inputs.numel()] = sequence_inputs
        targets[row, : sequence_targets.numel()] = sequence_targets
    return inputs, targets


def shuffled_batches(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch of training batches (lists of sequence indices) in random order. Sequences of
    similar length share a batch (sorted within pools of 50 batches) so that little is padding."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    pool = 50 * batch_size
    batches = []
    for start in range(0, len(order), pool):
        members = sorted(order[start:start + pool], key=lambda index: lengths[index])
        batches.extend(members[i:i + batch_size] for i in range(0, len(members), batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches: longest sequences first (so the worst memory use shows at once)."""
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class TrainingBatches:
    """The training split as numbered batches: batch `index` of epoch `epoch`, either mode.

    Stream mode reads the same columns every epoch and carries the state across chunks; sentences
    mode shuffles with a generator seeded by (seed, epoch), so a resumed run sees the same order.
    """

    def __init__(self, tokenizer: Tokenizer, text: str | Tensor, *, mode: str, batch_size: int, bptt: int,
                 seed: int) -> None:
        """`text`: the split's text, or in stream mode its id stream already (e.g. from the token cache)."""
        self.carries_state = mode == "stream"
        self.batch_size, self.bptt, self.seed = batch_size, bptt, seed
        if self.carries_state:
            ids = text if isinstance(text, Tensor) else stream_ids(tokenizer, text)
            self.data = batchify(ids, batch_size)   # (B, N), a view: a memory-mapped stream stays on disk
            self.per_epoch = num_chunks(self.data, bptt)
        else:
            self.pieces = sentence_pieces(tokenizer, text, bptt)
            if not self.pieces:
                raise LmtrainError("the training split has no non-empty lines")
            self.lengths = [inputs.numel() for inputs, _ in self.pieces]
            self._order_epoch, self._order = -1, []
            self.per_epoch = len(self._epoch_order(0))

    def batch(self, epoch: int, index: int) -> InputsTargets:
        """(inputs, targets), each (B, T)."""
        if self.carries_state:
            inputs, targets = get_chunk(self.data, index, self.bptt)
            return inputs.long(), targets.long()
        return pad_batch([self.pieces[i] for i in self._epoch_order(epoch)[index]])

    def _epoch_order(self, epoch: int) -> list[list[int]]:
        if epoch != self._order_epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order_epoch, self._order = epoch, shuffled_batches(self.lengths, self.batch_size, generator)
        return self._order


def check_data_files(config: Config) -> None:
    """Training reads its corpus more than once (splitting, tokenizing) and fingerprints it for
    `--resume`: a pipe or a device cannot serve, and would hang or come back empty."""
    for key in DATA_PATHS:
        path = get_value(config, key)
        if path is not None and (kind := file_kind(path)) not in ("file", "missing", "directory"):
            raise LmtrainError(f"{key} {path} is a {kind}, not a regular file: training reads its corpus more "
                               f"than once and checks it on --resume; save it to a file first (lmtrain eval "
                               f"perplexity --data reads a pipe once)")


def line_count(split: str | torch.Tensor, eos_id: int) -> int:
    """How many lines a split holds (a last one without its line end counted): from its text, or from the
    `<eos>` ids of its cached stream after the one that starts it."""
    if isinstance(split, str):
        return split.count("\n") + (1 if split and not split.endswith("\n") else 0)
    return max(0, int((split == eos_id).sum()) - 1)
