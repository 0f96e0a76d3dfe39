"""From a corpus file to token ids, in one path whether the corpus is read whole or block by block.

    file --read_text_blocks--> blocks --split_pieces--> (split, piece) --+-- count_tokens   the vocabulary
                                                                          +-- encode_pieces  the id stream

Read into memory (`load_splits`, `fit_tokenizer`, `stream_ids`) the text is one block; the token cache
(lmtrain.data.cache) reads the file 16 MB at a time and never holds it whole. With `data.path`, the cuts
between the splits depend on the length of the whole text, so block by block a cheap first pass
(`text_length`, decoding only) comes before the two. Knows tokens, not models.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import warnings
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from itertools import accumulate, chain, groupby
from operator import itemgetter

import torch
from torch import Tensor

from lmtrain.config import DataConfig
from lmtrain.data.corpora import corpus_paths
from lmtrain.data.tokenizer import EOS, SPECIALS, Tokenizer, read_text, read_text_blocks
from lmtrain.errors import LmtrainError

SPLITS = ("train", "valid", "test")
LONG_LINE = 10_000          # a cut moves to its line's end unless that is further away than this
BLOCK_BYTES = 1 << 24       # read 16 MB at a time: a few hundred MB of short-lived tensors at char level
TEXT_BLOCK = 1 << 22        # characters of a text in memory encoded at a time: 16 MB of code points
UNICODE_SIZE = 0x110000     # code points
_LAST_SPACE = re.compile(r"\s(?=\S*\Z)")


def load_splits(config: DataConfig) -> dict[str, str]:
    """The text of each split that the config names: {"train": ..., "valid": ..., ["test": ...]}.

    With `data.path`, the file is cut into contiguous parts by `data.split` (first 90% train, then
    valid, then test: nanoGPT's convention for Tiny Shakespeare), see `split_pieces`.
    """
    config = with_corpus_files(config)
    texts = {name: "".join(pieces) for name, pieces in split_texts(config, whole=True)}
    if not texts["train"].strip():
        raise empty_training_text(config)
    return texts


def split_names(config: DataConfig) -> list[str]:
    """The splits the config has: train, valid and, where it names or cuts one, test."""
    config = with_corpus_files(config)
    if config.path is not None:
        return list(SPLITS[:len(config.split)])
    return [name for name in SPLITS if getattr(config, name) is not None]


def load_split(config: DataConfig, name: str) -> str:
    """The text of one split, as `load_splits` gives it: a split file is read alone (the training file
    may be far larger than the one scored), a split of `data.path` is cut from the whole file."""
    files = with_corpus_files(config)
    if files.path is not None:
        return load_splits(config)[name]
    return read_text(getattr(files, name), encoding=files.encoding, errors=files.encoding_errors)


def with_corpus_files(config: DataConfig) -> DataConfig:
    """`config` with a downloaded corpus (`data.corpus`) replaced by its files: its one file (cut by
    data.split) or its three."""
    if config.corpus is None:
        return config
    return dataclasses.replace(config, **{role: str(path) for role, path in corpus_paths(config.corpus).items()})


def empty_training_text(config: DataConfig) -> LmtrainError:
    return LmtrainError(f"the training text is empty or only whitespace ({config.path or config.train})")


def text_length(path: str, *, encoding: str, errors: str, block_bytes: int | None = None) -> int:
    """Characters in `read_text(path)`."""
    return sum(len(block) for block in read_text_blocks(path, encoding=encoding, errors=errors,
                                                        block_bytes=block_bytes or BLOCK_BYTES))


def split_texts(config: DataConfig, *, whole: bool = False, length: int | None = None,
                block_bytes: int | None = None, long_line: int = LONG_LINE) -> Iterator[tuple[str, Iterator[str]]]:
    """(split name, its text in pieces) for train, valid[, test] in that order, cut as `split_pieces`
    cuts. `config` names files (see `with_corpus_files`). `whole`: each file read into memory at once, one
    piece; else `block_bytes` at a time, with `length`: `text_length(data.path)` if known already. Read
    each split's pieces before asking for the next split."""
    block_bytes = -1 if whole else block_bytes or BLOCK_BYTES  # read at call time: a test can make blocks tiny
    read = lambda path: read_text_blocks(path, encoding=config.encoding, errors=config.encoding_errors,  # noqa: E731
                                         block_bytes=block_bytes)
    if config.path is None:
        yield from ((name, read(getattr(config, name))) for name in SPLITS if getattr(config, name) is not None)
        return
    if whole:
        text = read_text(config.path, encoding=config.encoding, errors=config.encoding_errors)
        blocks, total = [text], len(text)
    else:
        blocks, total = read(config.path), length if length is not None else text_length(
            config.path, encoding=config.encoding, errors=config.encoding_errors, block_bytes=block_bytes)
    pieces = split_pieces(blocks, cut_offsets(total, config.split), total=total, long_line=long_line)
    for index, group in groupby(pieces, key=itemgetter(0)):
        yield SPLITS[index], (piece for _, piece in group)


def split_points(text: str, fractions: list[float], *, long_line: int = LONG_LINE) -> list[int]:
    """Character offsets [0, ..., len(text)] where `split_pieces` cuts `text` into parts of the given
    fractions: each cut moves forward to the end of its line, so no word or sentence is split between
    two parts, unless that line goes on for more than `long_line` characters (a corpus may be one long
    line)."""
    lengths = [0] * len(fractions)
    for index, piece in split_pieces([text], cut_offsets(len(text), fractions), total=len(text), long_line=long_line):
        lengths[index] += len(piece)
    return list(accumulate(lengths, initial=0))


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


def split_pieces(blocks: Iterable[str], cuts: list[int], *, total: int,
                 long_line: int = LONG_LINE) -> Iterator[tuple[int, str]]:
    """(split index, piece) of a text of `total` characters given in blocks, cut at `cuts` (`cut_offsets`),
    each cut moved to its line's end (`line_end_bound`): the pieces of split i joined are the text between
    bounds i and i + 1 (`split_points`), and every split gets at least one piece (maybe ""). Only the
    text from the next cut - 1 on is held back, while the search for the line end after that cut waits
    for more text:

        blocks   | a b \\n c d | e \\n f g |        cuts [4], long_line 3
        pieces   (0, "ab\\n")  (0, "cde\\n")  (1, "fg")
    """
    buffer, start, split = "", 0, 0  # buffer = text[start : start + len(buffer)], not yet given out
    given = -1  # the last split that was given a piece
    for block in chain(blocks, [None]):
        at_end = block is None
        buffer += block or ""
        while split < len(cuts) and (at_end or start + len(buffer) >= cuts[split] + long_line):
            cut = cuts[split]
            # A cut before `start` lies inside the line that the previous bound already closed.
            bound = start if cut - 1 < start else line_end_bound(buffer, cut, window_start=start, total=total,
                                                                  long_line=long_line)
            yield split, buffer[: bound - start]
            buffer, start, split, given = buffer[bound - start:], bound, split + 1, split
        if at_end:
            if buffer or given < split:
                yield split, buffer
        elif (keep := len(buffer) if split == len(cuts) else min(len(buffer), cuts[split] - 1 - start)) > 0:
            yield split, buffer[:keep]
            buffer, start, given = buffer[keep:], start + keep, split


def whole_words(pieces: Iterable[str]) -> Iterator[str]:
    """The same text, re-cut so that no piece ends inside a word: each piece's unfinished last word
    goes to the front of the next one. (Word tokens are `str.split` tokens, so any whitespace
    character is a safe place to cut.)"""
    carried = ""
    for piece in pieces:
        piece = carried + piece
        cut = max(piece.rfind(" "), piece.rfind("\n"), piece.rfind("\t")) + 1
        if cut == 0 and (found := _LAST_SPACE.search(piece)):  # only rarer whitespace, or none
            cut = found.end()
        if cut:
            yield piece[:cut]
        carried = piece[cut:]
    if carried:
        yield carried


def count_tokens(pieces: Iterable[str], *, level: str, eos: str) -> Counter:
    """How often each token occurs in the text given in pieces, `<eos>` once a line when
    `eos == "line"`: what `Tokenizer.fit` counts (give it to `Tokenizer.from_counts`)."""
    counts: Counter = Counter()
    code_counts = torch.zeros(0, dtype=torch.long) if level == "char" else None  # grows to the largest code point
    newlines, last = 0, ""
    for piece in (pieces if level == "char" else whole_words(pieces)):
        if not piece:
            continue
        if code_counts is not None:  # bincount of the code points: C speed, where Counter(str) is Python's
            piece_counts = torch.bincount(code_points(piece))
            if piece_counts.numel() > code_counts.numel():
                code_counts = torch.cat([code_counts, torch.zeros(piece_counts.numel() - code_counts.numel(),
                                                                  dtype=torch.long)])
            code_counts[: piece_counts.numel()] += piece_counts
        else:
            counts.update(piece.split())
        newlines, last = newlines + piece.count("\n"), piece[-1]
    if code_counts is not None:
        present = code_counts.nonzero().flatten().tolist()
        counts.update(dict(zip(map(chr, present), code_counts[present].tolist())))
    if eos == "line":
        counts.pop("\n", None)
        lines = newlines + (1 if last and last != "\n" else 0)
        if lines:
            counts[EOS] = lines
    return counts


def fit_tokenizer(config: DataConfig, text: str | Iterable[str]) -> Tokenizer:
    """The vocabulary of the training text (given whole, or in pieces), as `Tokenizer.fit` builds it."""
    counts = count_tokens([text] if isinstance(text, str) else text, level=config.level, eos=config.eos)
    if not any(token != EOS and not token.isspace() for token in counts):
        raise empty_training_text(config)
    tokenizer = Tokenizer.from_counts(counts, level=config.level, eos=config.eos, min_freq=config.min_freq,
                                      max_vocab=config.max_vocab)
    if tokenizer.vocab_size <= len(SPECIALS):  # the text has tokens (checked above): min_freq dropped them all
        most = max(count for token, count in counts.items() if token not in SPECIALS)
        raise LmtrainError(f"data.min_freq={config.min_freq} leaves no token in the vocabulary: the most frequent "
                           f"one in the training text occurs {most:,} time{'s' * (most != 1)}; lower it")
    return tokenizer


def stream_ids(tokenizer: Tokenizer, text: str) -> Tensor:
    """The split as one id stream (int32, 4 bytes a token), starting with `<eos>` so the first token is
    read as the start of a line, just as every later line follows an `<eos>`: `encode_pieces` of the
    text cut into blocks, so a corpus in memory never becomes a Python list (it may be one 50 MB line)."""
    blocks = (text[start:start + TEXT_BLOCK] for start in range(0, len(text), TEXT_BLOCK))
    return torch.cat([ids for ids, _ in encode_pieces(tokenizer, blocks, count_unknown=False)])


def encode_pieces(tokenizer: Tokenizer, pieces: Iterable[str], *,
                  count_unknown: bool = True) -> Iterator[tuple[Tensor, int]]:
    """`stream_ids(tokenizer, text)` of the text given in pieces, as consecutive blocks of int32 ids,
    each with how many of its tokens are not in the vocabulary (as `Tokenizer.count_unknown` counts:
    a literal `<unk>` word is known; at char level 0 unless `count_unknown`, which costs a pass)."""
    eos_block = torch.tensor([tokenizer.eos_id], dtype=torch.int32)
    yield eos_block, 0  # the stream starts with <eos>: the first line is read as a line start
    encode = (_char_encoder(tokenizer, count_unknown) if tokenizer.level == "char" else _word_encoder(tokenizer))
    last = ""
    for piece in (pieces if tokenizer.level == "char" else whole_words(pieces)):
        if piece:
            yield encode(piece)
            last = piece[-1]
    if tokenizer.eos == "line" and last and last != "\n":
        yield eos_block, 0  # the last line's <eos>, as `encode` adds it


def _char_encoder(tokenizer: Tokenizer, count_unknown: bool):
    table = char_table(tokenizer, size=UNICODE_SIZE)  # 4.4 MB, and no clamping of code points

    def encode(piece: str) -> tuple[Tensor, int]:
        ids = lookup_chars(table, piece, out=torch.empty(len(piece), dtype=torch.int32))
        # No character is spelled "<unk>": every <unk> stands for an unknown character.
        return ids, int(torch.count_nonzero(ids == tokenizer.unk_id)) if count_unknown else 0
    return encode


class _Vocabulary(dict):
    """token -> id; an unknown token is `<unk>`, and counted."""
    misses = 0

    def __missing__(self, token: str) -> int:
        self.misses += 1
        return 0


def _word_encoder(tokenizer: Tokenizer):
    vocabulary, eos_id, by_line = _Vocabulary(tokenizer.ids), tokenizer.eos_id, tokenizer.eos == "line"
    lookup = vocabulary.__getitem__

    def encode(piece: str) -> tuple[Tensor, int]:
        ids, misses = array("i"), vocabulary.misses
        if by_line:  # each "\n" ends a line: its <eos>; the text after the last one continues in the next piece
            *lines, rest = piece.split("\n")
            for line in lines:
                ids.extend(map(lookup, line.split()))
                ids.append(eos_id)
            piece = rest
        ids.extend(map(lookup, piece.split()))
        block = torch.frombuffer(ids, dtype=torch.int32) if ids else torch.empty(0, dtype=torch.int32)
        return block, vocabulary.misses - misses
    return encode


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
