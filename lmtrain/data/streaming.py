"""Tokenizing a corpus in passes over blocks of its text, never holding the text whole.

Each function gives, piece by piece, exactly what the in-memory path gives for the whole text
(`load_splits`, `Tokenizer.fit`, `stream_ids`); the token cache (lmtrain.data.cache) is built from them:

    file --read_text_blocks--> blocks --split_pieces--> (split, piece) --+-- count_tokens   pass 1: vocabulary
                                                                          +-- encode_pieces  pass 2: id stream

With `data.path`, the cuts between the splits depend on the length of the whole text, so a cheap
first pass (`text_length`, decoding only) comes before the two. Knows tokens, not models.
"""

from __future__ import annotations

import re
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from itertools import chain, groupby
from operator import itemgetter

import torch
from torch import Tensor

from lmtrain.config import DataConfig
from lmtrain.data.dataset import LONG_LINE, SPLITS, char_table, code_points, cut_offsets, line_end_bound, lookup_chars
from lmtrain.data.tokenizer import EOS, Tokenizer, read_text_blocks

BLOCK_BYTES = 1 << 24       # read 16 MB at a time: a few hundred MB of short-lived tensors at char level
UNICODE_SIZE = 0x110000     # code points
_LAST_SPACE = re.compile(r"\s(?=\S*\Z)")


def text_length(path: str, *, encoding: str, errors: str, block_bytes: int | None = None) -> int:
    """Characters in `read_text(path)`."""
    return sum(len(block) for block in read_text_blocks(path, encoding=encoding, errors=errors,
                                                        block_bytes=block_bytes or BLOCK_BYTES))


def split_texts(config: DataConfig, *, length: int | None = None, block_bytes: int | None = None,
                long_line: int = LONG_LINE) -> Iterator[tuple[str, Iterator[str]]]:
    """(split name, its text in pieces) for train, valid[, test] in that order, as `load_splits` cuts
    them. `config` names files (see `data.with_corpus_files`); `length`: `text_length(data.path)` if
    known already. Read each split's pieces before asking for the next split."""
    block_bytes = block_bytes or BLOCK_BYTES  # read at call time, so that a test can make blocks tiny
    read = lambda path: read_text_blocks(path, encoding=config.encoding, errors=config.encoding_errors,  # noqa: E731
                                         block_bytes=block_bytes)
    if config.path is None:
        yield from ((name, read(getattr(config, name))) for name in SPLITS if getattr(config, name) is not None)
        return
    total = length if length is not None else text_length(config.path, encoding=config.encoding,
                                                          errors=config.encoding_errors, block_bytes=block_bytes)
    pieces = split_pieces(read(config.path), cut_offsets(total, config.split), total=total, long_line=long_line)
    for index, group in groupby(pieces, key=itemgetter(0)):
        yield SPLITS[index], (piece for _, piece in group)


def split_pieces(blocks: Iterable[str], cuts: list[int], *, total: int,
                 long_line: int = LONG_LINE) -> Iterator[tuple[int, str]]:
    """(split index, piece) of a text of `total` characters given in blocks, cut where `split_points`
    cuts it: the pieces of split i joined are text[bounds[i]:bounds[i + 1]], and every split gets at
    least one piece (maybe ""). Only the text from the next cut - 1 on is held back, while the
    search for the line end after that cut waits for more text:

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

