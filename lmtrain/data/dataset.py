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

import dataclasses
import sys
import warnings

import torch
from torch import Tensor

from lmtrain.config import DATA_PATHS, Config, DataConfig, get_value
from lmtrain.data.corpora import corpus_paths
from lmtrain.data.tokenizer import ZERO_INPUT, Tokenizer, file_kind, read_text, split_lines
from lmtrain.errors import LmtrainError

IGNORE = -100  # target id left out of the loss (torch's cross_entropy default ignore_index)
SPLITS = ("train", "valid", "test")
LONG_LINE = 10_000

Sequence = tuple[Tensor, Tensor]  # (inputs (T,), targets (T,))


def load_splits(config: DataConfig) -> dict[str, str]:
    """The text of each split that the config names: {"train": ..., "valid": ..., ["test": ...]}.

    With `data.path`, the file is cut into contiguous parts by `data.split` (first 90% train, then
    valid, then test: nanoGPT's convention for Tiny Shakespeare), see `split_points`.
    """
    read = lambda path: read_text(path, encoding=config.encoding, errors=config.encoding_errors)  # noqa: E731
    config = with_corpus_files(config)
    if config.path is not None:
        text = read(config.path)
        bounds = split_points(text, config.split)
        texts = {name: text[start:end] for name, start, end in zip(SPLITS, bounds, bounds[1:])}
        origin = config.path
    else:
        texts = {name: read(getattr(config, name)) for name in SPLITS if getattr(config, name) is not None}
        origin = config.train
    if not texts["train"].strip():
        raise LmtrainError(f"the training text is empty or only whitespace ({origin})")
    return texts


def with_corpus_files(config: DataConfig) -> DataConfig:
    """`config` with a downloaded corpus (`data.corpus`) replaced by its files: its one file (cut by
    data.split) or its three."""
    if config.corpus is None:
        return config
    return dataclasses.replace(config, **{role: str(path) for role, path in corpus_paths(config.corpus).items()})


def split_points(text: str, fractions: list[float], *, long_line: int = LONG_LINE) -> list[int]:
    """Character offsets [0, ..., len(text)] cutting `text` into parts of the given fractions. Each
    cut moves forward to the end of its line so no word or sentence is split between two parts,
    unless that line goes on for more than `long_line` characters (a corpus may be one long line)."""
    bounds = [0]
    for cut in cut_offsets(len(text), fractions):
        bound = line_end_bound(text, cut, window_start=0, total=len(text), long_line=long_line)
        bounds.append(max(bounds[-1], bound))
    return [*bounds, len(text)]


def cut_offsets(length: int, fractions: list[float]) -> list[int]:
    """Where a text of `length` characters would be cut by the fractions, before moving to line ends."""
    cuts, cumulative = [], 0.0
    for fraction in fractions[:-1]:
        cumulative += fraction
        cuts.append(round(cumulative * length))
    return cuts


def line_end_bound(window: str, cut: int, *, window_start: int, total: int, long_line: int = LONG_LINE) -> int:
    """The bound that `cut` moves to: just past the first line end at or after offset cut - 1, if
    one comes within `long_line` characters; else the end of the text if that comes first, else
    `cut` itself. `window` is text[window_start:] of a text of `total` characters, or enough of it:
    from offset cut - 1 (>= window_start) to cut + long_line.

        text    a b c \n d e \n f       cut 2 -> 4 (after "abc\n")
    """
    if cut <= 0:
        return 0
    line_end = window.find("\n", cut - 1 - window_start, cut + long_line - window_start)
    if line_end >= 0:
        return window_start + line_end + 1
    return total if total - cut <= long_line else cut


def reverse_text(text: str, *, level: str, eos: str = "line") -> str:
    """The text read right to left, for the right-to-left LM of `model.direction: bi`: the lines in reverse
    order, the tokens of each line reversed. Its id stream is the forward stream flipped, and each
    reversed line still ends in `<eos>`:  "a b\nc d\n" -> "d c\nb a\n"."""
    if eos == "none":
        return text[::-1] if level == "char" else " ".join(reversed(text.split()))
    flip = (lambda line: line[::-1]) if level == "char" else (lambda line: " ".join(reversed(line.split())))
    return "".join(flip(line) + "\n" for line in reversed(split_lines(text)))


def fit_tokenizer(config: DataConfig, train_text: str) -> Tokenizer:
    tokenizer = Tokenizer.fit(train_text, level=config.level, eos=config.eos, min_freq=config.min_freq,
                              max_vocab=config.max_vocab)
    if tokenizer.vocab_size <= 2:
        raise LmtrainError("the training text has no tokens besides line ends")
    return tokenizer


def stream_ids(tokenizer: Tokenizer, text: str) -> Tensor:
    """The split as one id stream (int32, 4 bytes a token), starting with `<eos>` so the first token is
    read as the start of a line, just as every later line follows an `<eos>`."""
    if tokenizer.level == "char":
        return char_ids(tokenizer, text, start_with_eos=True)
    return torch.tensor([tokenizer.eos_id, *tokenizer.encode(text)], dtype=torch.int32)


def char_ids(tokenizer: Tokenizer, text: str, *, start_with_eos: bool = False, block: int = 1 << 22) -> Tensor:
    """`tokenizer.encode(text)` for a character tokenizer, vectorised: code points (UTF-32) looked up
    in a table, `block` characters at a time, so a corpus costs 4 bytes a character and never a
    Python list (a corpus may be one 50 MB line)."""
    table = char_table(tokenizer)
    last_eos = tokenizer.eos == "line" and bool(text) and not text.endswith("\n")  # the last line's <eos>
    offset = int(start_with_eos)
    ids = torch.empty(offset + len(text) + int(last_eos), dtype=torch.int32)
    ids[: offset] = tokenizer.eos_id
    ids[ids.numel() - int(last_eos):] = tokenizer.eos_id
    for start in range(0, len(text), block):
        part = text[start:start + block]
        lookup_chars(table, part, out=ids[offset + start: offset + start + len(part)])
    return ids


def char_table(tokenizer: Tokenizer, *, size: int = 0) -> Tensor:
    """The id of every code point up to the largest one in the vocabulary, then one more entry,
    `<unk>`, for every code point beyond (int32); at least `size` entries (0x110000: every code point,
    and `lookup_chars` need not clamp). A line end is `<eos>` when `eos == "line"`."""
    known = {ord(token): index for index, token in enumerate(tokenizer.tokens) if len(token) == 1}
    if tokenizer.eos == "line":
        known[ord("\n")] = tokenizer.eos_id
    table = torch.full((max(max(known, default=0) + 2, size),), tokenizer.unk_id, dtype=torch.int32)
    table[list(known)] = torch.tensor(list(known.values()), dtype=torch.int32)
    return table


def lookup_chars(table: Tensor, text: str, *, out: Tensor) -> Tensor:
    """Write the ids of the characters of `text` into `out` (int32, len(text)): no line-end handling
    beyond the table's, no `<eos>` added."""
    codes = code_points(text)
    if table.numel() <= sys.maxunicode:
        codes = codes.clamp(max=table.numel() - 1)  # beyond the table: its last entry, <unk>
    return torch.index_select(table, 0, codes, out=out)


def code_points(text: str) -> Tensor:
    """The code points of `text` (int32, read-only: a view of its UTF-32 bytes)."""
    if not text:
        return torch.empty(0, dtype=torch.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a read-only buffer is fine: it is only read
        return torch.frombuffer(text.encode("utf-32-le"), dtype=torch.int32)


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


def get_chunk(data: Tensor, index: int, bptt: int) -> Sequence:
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


def shard_batch(batch: Sequence, *, rank: int, world_size: int) -> Sequence:
    """Process `rank`'s rows of a global (inputs, targets) batch, less the columns that are padding in
    all of them. A process left with no row (the last sentences batch of an epoch may hold fewer than
    `world_size`) gets one padding row: no loss, but its backward pass runs, as DDP needs of all."""
    inputs, targets = (tensor[shard_rows(tensor.size(0), rank=rank, world_size=world_size)] for tensor in batch)
    real_columns = (targets != IGNORE).any(dim=0).nonzero()
    if real_columns.numel() == 0:
        return torch.full((1, 1), ZERO_INPUT, dtype=inputs.dtype), torch.full((1, 1), IGNORE, dtype=targets.dtype)
    length = int(real_columns[-1]) + 1
    return inputs[:, :length], targets[:, :length]


def sentence_pieces(tokenizer: Tokenizer, text: str, max_length: int) -> list[Sequence]:
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


def stream_segments(ids: Tensor, segment_length: int) -> list[Sequence]:
    """An id stream as consecutive segments whose targets cover every token after the first exactly
    once; evaluation reads each from a zero state. Fixed by `segment_length`, not by the batch size,
    so the loss does not depend on how many segments run side by side."""
    if ids.numel() < 2:
        return []
    inputs, targets = ids[:-1], ids[1:]
    return list(zip(inputs.split(segment_length), targets.split(segment_length)))


def pad_batch(sequences: list[Sequence]) -> Sequence:
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

    def batch(self, epoch: int, index: int) -> Sequence:
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
