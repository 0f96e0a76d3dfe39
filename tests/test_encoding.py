"""lmtrain.data.encoding: a corpus read in blocks gives exactly what the whole text gives: the same split
cuts, the same vocabulary as `Tokenizer.fit`, the same ids as `Tokenizer.encode`, the same unknown counts."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from lmtrain.config import DataConfig
from lmtrain.data import encoding
from lmtrain.data.encoding import (
    count_tokens,
    cut_offsets,
    encode_pieces,
    load_splits,
    split_pieces,
    split_points,
    split_texts,
    stream_ids,
    whole_words,
)
from lmtrain.data.tokenizer import Tokenizer

ALPHABET = "ab c\n\n \té\u3000x"  # words, spaces, tabs, empty lines, a non-ASCII letter and space
TEXTS = ["", "\n", "a", "ab\n", "ab\ncd", "the cat sat\nthe dog ran\n\na cat\n", "  x \n\n y\u3000z\t\n",
         "word " * 30, "é\nü\n" * 7]


def random_texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [*TEXTS, *("".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 60))) for _ in range(count))]


def blocks_of(text: str, size: int) -> list[str]:
    return [text[start:start + size] for start in range(0, len(text), size)]


def pieces_by_split(text: str, fractions: list[float], *, size: int, long_line: int) -> list[list[str]]:
    parts: dict[int, list[str]] = {}
    for index, piece in split_pieces(blocks_of(text, size), cut_offsets(len(text), fractions), total=len(text),
                                     long_line=long_line):
        parts.setdefault(index, []).append(piece)
    assert list(parts) == list(range(len(fractions)))  # every split, in order, even an empty one
    return [parts[index] for index in range(len(fractions))]


# --- cutting into splits ---------------------------------------------------------------------------

def test_split_pieces_documented_example():
    pieces = list(split_pieces(["ab\ncd", "e\nfg"], [4], total=9, long_line=3))
    assert pieces == [(0, "ab\n"), (0, "cde\n"), (1, "fg")]


@pytest.mark.parametrize("fractions", [[0.5, 0.5], [0.9, 0.1], [0.3, 0.3, 0.4], [0.01, 0.99], [0.98, 0.01, 0.01]])
def test_split_pieces_cut_where_split_points_cuts(fractions: list[float]):
    rng = random.Random(1)
    for text in random_texts(150):
        long_line, size = rng.randint(1, 8), rng.randint(1, 7)
        bounds = split_points(text, fractions, long_line=long_line)
        expected = [text[start:end] for start, end in zip(bounds, bounds[1:])]
        got = pieces_by_split(text, fractions, size=size, long_line=long_line)
        assert ["".join(pieces) for pieces in got] == expected, (text, long_line, size)


def test_split_pieces_hold_back_only_near_a_cut():
    # A 1000-character text in 10-character blocks, cut at 500: the first split arrives in pieces.
    text = "abcdefghi\n" * 100
    pieces = list(split_pieces(blocks_of(text, 10), [500], total=len(text), long_line=20))
    assert max(len(piece) for _, piece in pieces) <= 40
    assert "".join(piece for index, piece in pieces if index == 0) == text[:500]


def test_whole_words_never_cut_a_word():
    text = "alpha beta\ngamma\tdelta\u3000epsilon zeta  eta\n"
    for size in range(1, 12):
        pieces = list(whole_words(blocks_of(text, size)))
        assert "".join(pieces) == text
        assert [word for piece in pieces for word in piece.split()] == text.split()


# --- counting and encoding ---------------------------------------------------------------------------

@pytest.mark.parametrize("level", ["char", "word"])
@pytest.mark.parametrize("eos", ["line", "none"])
def test_counts_give_the_vocabulary_fit_gives(level: str, eos: str):
    for text in random_texts(60, seed=2):
        for options in ({}, {"min_freq": 2}, {"max_vocab": 4}):
            fitted = Tokenizer.fit(text, level=level, eos=eos, **options)
            counts = count_tokens(blocks_of(text, 5), level=level, eos=eos)
            assert Tokenizer.from_counts(counts, level=level, eos=eos, **options) == fitted, text


@pytest.mark.parametrize("level", ["char", "word"])
@pytest.mark.parametrize("eos", ["line", "none"])
def test_encode_pieces_equal_stream_ids_and_count_unknown(level: str, eos: str):
    tokenizer = Tokenizer.fit("ab c\nab\n", level=level, eos=eos)  # é, x, \u3000... are unknown
    for size, text in enumerate(random_texts(60, seed=3)):
        blocks = list(encode_pieces(tokenizer, blocks_of(text, size % 6 + 1)))
        expected = [tokenizer.eos_id, *tokenizer.encode(text)]  # the tokenizer's own encoding, token by token
        assert torch.cat([ids for ids, _ in blocks]).tolist() == expected == stream_ids(tokenizer, text).tolist()
        assert sum(unknown for _, unknown in blocks) == tokenizer.count_unknown(text)[0], text


def test_a_literal_unk_word_is_known_but_an_unseen_word_is_not():
    tokenizer = Tokenizer.fit("a b\n", level="word")
    blocks = list(encode_pieces(tokenizer, ["a <unk> zz\n"]))
    assert torch.cat([ids for ids, _ in blocks]).tolist() == [1, 2, 0, 0, 1]
    assert sum(unknown for _, unknown in blocks) == 1 == tokenizer.count_unknown("a <unk> zz\n")[0]


# --- from files ----------------------------------------------------------------------------------------

CORPORA = {
    "plain": "the cat sat\nthe dog ran\na cat ran\n\nthe end\n" * 5,
    "no final newline": "one two\nthree four five\nsix",
    "non-ASCII and CRLF": "naïve café\r\nüber straße\r\n日本語 テキスト\r\n" * 4,
    "lone CR line ends": "the cat sat\rthe dog ran\ra cat ran\r\rthe end\r" * 5,
    "mixed line ends": "one two\r\nthree\rfour five\nsix\r\n\rseven" * 3,
}


@pytest.mark.parametrize("name", list(CORPORA))
@pytest.mark.parametrize("fractions", [[0.9, 0.1], [0.6, 0.2, 0.2]])
def test_split_texts_of_a_file_equal_load_splits(tmp_path: Path, monkeypatch, name: str, fractions: list[float]):
    monkeypatch.setattr(encoding, "BLOCK_BYTES", 7)  # many blocks, multi-byte characters cut between them
    path = tmp_path / "corpus.txt"
    path.write_bytes(("\ufeff" + CORPORA[name]).encode("utf-8"))
    config = DataConfig(path=str(path), split=fractions)
    got = {split: "".join(pieces) for split, pieces in split_texts(config)}
    assert got == load_splits(config)


def test_split_texts_of_three_files_equal_load_splits(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(encoding, "BLOCK_BYTES", 3)
    files = {split: tmp_path / f"{split}.txt" for split in ("train", "valid", "test")}
    for split, path in files.items():
        path.write_text(f"{split} text é\nline two", encoding="utf-8")
    config = DataConfig(**{split: str(path) for split, path in files.items()})
    assert {split: "".join(pieces) for split, pieces in split_texts(config)} == load_splits(config)


def test_split_texts_replace_undecodable_bytes(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(encoding, "BLOCK_BYTES", 2)
    path = tmp_path / "bad.txt"
    path.write_bytes(b"ok\n\xfe\nfine \xe2\x82\n" * 3)
    config = DataConfig(path=str(path), split=[0.5, 0.5], encoding_errors="replace")
    assert {split: "".join(pieces) for split, pieces in split_texts(config)} == load_splits(config)
