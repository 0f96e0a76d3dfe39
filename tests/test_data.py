"""lmtrain.data.dataset: the documented batch layouts; targets are the inputs shifted by one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmtrain.config import DataConfig
from lmtrain.data import encoding
from lmtrain.data.dataset import (
    IGNORE,
    TrainingBatches,
    batchify,
    get_chunk,
    length_sorted_batches,
    num_chunks,
    pad_batch,
    reverse_text,
    reversed_stream,
    sentence_pieces,
    shuffled_batches,
    stream_segments,
)
from lmtrain.data.encoding import fit_tokenizer, line_end_bound, load_splits, split_points, stream_ids
from lmtrain.data.tokenizer import ZERO_INPUT, Tokenizer
from lmtrain.errors import LmtrainError


def letters(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.long)


# --- stream mode -----------------------------------------------------------------------------------

def test_batchify_documented_layout():
    data = batchify(letters(26), 4)  # a..z as 0..25
    assert data.tolist() == [[0, 1, 2, 3, 4, 5],
                             [6, 7, 8, 9, 10, 11],
                             [12, 13, 14, 15, 16, 17],
                             [18, 19, 20, 21, 22, 23]]  # y z dropped


def test_batchify_exact_multiple_keeps_everything():
    assert batchify(letters(6), 3).tolist() == [[0, 1], [2, 3], [4, 5]]


@pytest.mark.parametrize("n, batch_size", [(7, 4), (3, 2), (0, 1), (1, 1)])
def test_batchify_too_few_tokens(n: int, batch_size: int):
    with pytest.raises(LmtrainError, match=f"has {n} tokens: too few for train.batch_size {batch_size}"):
        batchify(letters(n), batch_size)


def test_get_chunk_documented_example():
    data = letters(7).view(1, 7)  # a b c d e f g
    inputs, targets = get_chunk(data, 1, 3)
    assert inputs.tolist() == [[3, 4, 5]] and targets.tolist() == [[4, 5, 6]]


def test_chunks_targets_shifted_last_shorter():
    data = batchify(letters(30), 3)  # (3, 10)
    bptt = 4
    assert num_chunks(data, bptt) == 3  # 9 predictions per row: 4 + 4 + 1
    seen_inputs, seen_targets = [], []
    for index in range(num_chunks(data, bptt)):
        inputs, targets = get_chunk(data, index, bptt)
        assert inputs.shape == targets.shape
        assert inputs.shape[1] == (4 if index < 2 else 1)
        assert torch.equal(targets[:, :-1], inputs[:, 1:])
        assert torch.equal(targets, inputs + 1)  # the stream is consecutive integers
        seen_inputs.append(inputs)
        seen_targets.append(targets)
    assert torch.equal(torch.cat(seen_inputs, 1), data[:, :-1])
    assert torch.equal(torch.cat(seen_targets, 1), data[:, 1:])


@pytest.mark.parametrize("columns, bptt, expected", [(2, 1, 1), (2, 5, 1), (10, 3, 3), (10, 9, 1), (11, 5, 2),
                                                     (12, 5, 3)])
def test_num_chunks(columns: int, bptt: int, expected: int):
    data = torch.zeros(2, columns, dtype=torch.long)
    assert num_chunks(data, bptt) == expected
    total = sum(get_chunk(data, i, bptt)[0].shape[1] for i in range(expected))
    assert total == columns - 1


def test_stream_ids_start_with_eos(char_tokenizer: Tokenizer):
    ids = stream_ids(char_tokenizer, "ab\nc\n")
    assert ids.dtype == torch.int32  # 4 bytes a token: corpora of any size
    assert ids.tolist() == [1, *char_tokenizer.encode("ab\nc\n")]


@pytest.mark.parametrize("eos", ["line", "none"])
@pytest.mark.parametrize("text", ["", "a", "ab\nc", "ab\nc\n", "\n\n", "héllo wörld 🙂\nz\n", "unseen: ẞ 🙈 x\n"])
def test_vectorised_char_stream_equals_encode(text: str, eos: str, monkeypatch):
    monkeypatch.setattr(encoding, "TEXT_BLOCK", 2)  # blocks of the text in memory, cut inside lines
    tokenizer = Tokenizer.fit("abcdefgh héllo wörld 🙂 xyz\n", level="char", eos=eos)
    assert stream_ids(tokenizer, text).tolist() == [tokenizer.eos_id, *tokenizer.encode(text)]


def test_char_counts_match_the_list_path():
    text = "ab\nc 🙂\n\nq"
    tokenizer = Tokenizer.fit("abc\n", level="char")
    unknown, total = tokenizer.count_unknown(text)
    units = tokenizer.encode(text)
    assert total == len(units) and unknown == units.count(tokenizer.unk_id)


@pytest.mark.parametrize("level", ["char", "word"])
@pytest.mark.parametrize("eos", ["line", "none"])
@pytest.mark.parametrize("text", ["", "a", "ab cd\nc", "ab\nc d e\n", "\n\n", "héllo wörld 🙂\n\nz \n"])
def test_reversed_stream_is_the_stream_of_the_reversed_text(text: str, level: str, eos: str):
    tokenizer = Tokenizer.fit("ab cd e\nhéllo", level=level, eos=eos)
    expected = stream_ids(tokenizer, reverse_text(text, level=level, eos=eos))
    for dtype in (torch.int32, torch.uint8, torch.uint16):  # as the token cache stores them
        assert reversed_stream(stream_ids(tokenizer, text).to(dtype), eos=eos).tolist() == expected.tolist()


def test_stream_segments_cover_every_token_once():
    ids = letters(11)
    segments = stream_segments(ids, 4)
    assert [inputs.numel() for inputs, _ in segments] == [4, 4, 2]
    for inputs, targets in segments:
        assert torch.equal(targets, inputs + 1)
    assert torch.equal(torch.cat([targets for _, targets in segments]), ids[1:])
    assert torch.equal(torch.cat([inputs for inputs, _ in segments]), ids[:-1])


@pytest.mark.parametrize("n", [0, 1])
def test_stream_segments_never_empty(n: int):
    # An empty split (stream_ids of "" is just [<eos>]) has nothing to score: no segments, so that
    # evaluation can report "no tokens" instead of scoring an empty segment (0 / 0 = NaN loss).
    assert stream_segments(letters(n), 4) == []


def test_stream_segments_no_segment_is_empty():
    assert all(inputs.numel() > 0 for inputs, _ in stream_segments(letters(9), 4))


# --- sentences mode --------------------------------------------------------------------------------

def test_sentence_pieces_documented_example():
    tokenizer = Tokenizer.fit("the cat sat\n", level="word")
    ((inputs, targets),) = sentence_pieces(tokenizer, "the cat sat\n", 10)
    the, cat, sat = (tokenizer.ids[w] for w in ("the", "cat", "sat"))
    assert inputs.tolist() == [ZERO_INPUT, the, cat, sat]
    assert targets.tolist() == [the, cat, sat, tokenizer.eos_id]


def test_sentence_pieces_skip_empty_lines(char_tokenizer: Tokenizer):
    pieces = sentence_pieces(char_tokenizer, "ab\n\n\nc\n", 10)
    assert [targets.tolist() for _, targets in pieces] == [char_tokenizer.encode("ab\n"), char_tokenizer.encode("c\n")]


def test_sentence_pieces_split_long_lines(char_tokenizer: Tokenizer):
    line = "the cat sat the dog ran\n"  # 23 chars + <eos>
    pieces = sentence_pieces(char_tokenizer, line, 5)
    assert [inputs.numel() for inputs, _ in pieces] == [5, 5, 5, 5, 4]
    assert all(inputs.shape == targets.shape for inputs, targets in pieces)
    targets = torch.cat([targets for _, targets in pieces]).tolist()
    assert targets == char_tokenizer.encode(line)
    assert targets[-1] == char_tokenizer.eos_id
    inputs = torch.cat([inputs for inputs, _ in pieces]).tolist()
    assert inputs == [ZERO_INPUT, *targets[:-1]]
    # A later piece starts with the token before it as input.
    assert pieces[1][0][0].item() == pieces[0][1][-1].item()


def test_sentence_pieces_every_line(small_text: str, char_tokenizer: Tokenizer):
    pieces = sentence_pieces(char_tokenizer, small_text, 100)
    lines = [line for line in small_text.split("\n") if line]
    assert len(pieces) == len(lines)
    for (inputs, targets), line in zip(pieces, lines):
        assert inputs[0].item() == ZERO_INPUT
        assert targets.tolist() == char_tokenizer.encode(line + "\n")
        assert torch.equal(inputs[1:], targets[:-1])


def test_pad_batch():
    sequences = [(torch.tensor([ZERO_INPUT, 5]), torch.tensor([5, 1])),
                 (torch.tensor([ZERO_INPUT, 2, 3, 4]), torch.tensor([2, 3, 4, 1])),
                 (torch.tensor([ZERO_INPUT]), torch.tensor([1]))]
    inputs, targets = pad_batch(sequences)
    assert inputs.dtype == targets.dtype == torch.long
    assert inputs.tolist() == [[ZERO_INPUT, 5, ZERO_INPUT, ZERO_INPUT],
                               [ZERO_INPUT, 2, 3, 4],
                               [ZERO_INPUT, ZERO_INPUT, ZERO_INPUT, ZERO_INPUT]]
    assert targets.tolist() == [[5, 1, IGNORE, IGNORE], [2, 3, 4, 1], [1, IGNORE, IGNORE, IGNORE]]


def test_shuffled_batches_is_a_permutation():
    lengths = [(i * 7) % 13 + 1 for i in range(1000)]
    batches = shuffled_batches(lengths, 8, torch.Generator().manual_seed(3))
    flat = [index for batch in batches for index in batch]
    assert sorted(flat) == list(range(1000))
    assert all(1 <= len(batch) <= 8 for batch in batches)
    assert sum(len(batch) < 8 for batch in batches) <= 3  # only a pool's last batch is short (1000 = 400+400+200)


def test_shuffled_batches_group_similar_lengths():
    lengths = [(i * 7) % 13 + 1 for i in range(400)]  # one pool
    batches = shuffled_batches(lengths, 8, torch.Generator().manual_seed(3))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    assert spread <= len(batches)  # within a pool the batches are sorted by length


def test_shuffled_batches_seeded():
    lengths = list(range(200))
    first = shuffled_batches(lengths, 4, torch.Generator().manual_seed(7))
    again = shuffled_batches(lengths, 4, torch.Generator().manual_seed(7))
    other = shuffled_batches(lengths, 4, torch.Generator().manual_seed(8))
    assert first == again
    assert first != other


def test_length_sorted_batches():
    assert length_sorted_batches([3, 9, 1, 5, 7], 2) == [[1, 4], [3, 0], [2]]


# --- splits and files ------------------------------------------------------------------------------

def test_split_points_cut_at_line_ends():
    text = "aaaa\nbbbb\ncccc\ndddd\neeee\n"  # 25 chars, lines of 5
    bounds = split_points(text, [0.5, 0.5])
    assert bounds == [0, 15, 25]  # cut at 12.5 -> 12, moved to the end of "cccc\n"
    for bound in bounds[1:-1]:
        assert text[bound - 1] == "\n"


def test_line_end_bound_documented_example():
    assert line_end_bound("abc\nde\nf", 2, window_start=0, total=8) == 4
    assert line_end_bound("de\nf", 5, window_start=4, total=8, long_line=1) == 5  # no line end near: the cut
    assert line_end_bound("\nf", 7, window_start=6, total=8, long_line=1) == 7


def test_split_points_of_a_long_line_cut_inside_it():
    text = "x" * 50 + "\n"
    assert split_points(text, [0.5, 0.5], long_line=10) == [0, 26, 51]  # cut at round(25.5) = 26
    assert split_points(text, [0.5, 0.5], long_line=30) == [0, 51, 51]


def test_split_points_three_way_and_exact_line_start():
    text = "aaaa\n" * 10
    assert split_points(text, [0.8, 0.1, 0.1]) == [0, 40, 45, 50]


def test_split_points_last_line_without_newline():
    assert split_points("aaaa\nbbbbbbbbbbbb", [0.5, 0.5]) == [0, 17, 17]


def test_split_points_tiny_fraction_does_not_cut_a_line():
    # The first cut rounds to offset 0, the start of a line: it must stay there (an empty train part
    # is then reported by load_splits) rather than cut inside the first line.
    text = "abc\ndef\n"
    bounds = split_points(text, [0.01, 0.99])
    assert bounds[0] == 0 and bounds[-1] == len(text)
    assert all(b in (0, len(text)) or text[b - 1] == "\n" for b in bounds)


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_load_splits_from_one_file(tmp_path: Path):
    text = "".join(f"line {i}\n" for i in range(10))  # 70 chars
    config = DataConfig(path=write(tmp_path / "c.txt", text), split=[0.8, 0.1, 0.1])
    texts = load_splits(config)
    assert list(texts) == ["train", "valid", "test"]
    assert "".join(texts.values()) == text
    assert texts["train"] == "".join(f"line {i}\n" for i in range(8))
    assert texts["valid"] == "line 8\n" and texts["test"] == "line 9\n"
    two = load_splits(DataConfig(path=config.path, split=[0.9, 0.1]))
    assert list(two) == ["train", "valid"] and two["valid"] == "line 9\n"


def test_load_splits_from_files(tmp_path: Path):
    config = DataConfig(train=write(tmp_path / "t.txt", "a b\n"), valid=write(tmp_path / "v.txt", "c\r\n"))
    assert load_splits(config) == {"train": "a b\n", "valid": "c\n"}
    config.test = write(tmp_path / "x.txt", "\ufeffd\n")
    assert load_splits(config) == {"train": "a b\n", "valid": "c\n", "test": "d\n"}


def test_load_splits_errors(tmp_path: Path):
    with pytest.raises(LmtrainError, match="empty or only whitespace"):
        load_splits(DataConfig(train=write(tmp_path / "t.txt", " \n\n"), valid=write(tmp_path / "v.txt", "c\n")))
    with pytest.raises(LmtrainError, match="corpus file not found"):
        load_splits(DataConfig(train=str(tmp_path / "missing.txt"), valid=str(tmp_path / "v.txt")))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\xfe\n")
    with pytest.raises(LmtrainError, match="byte offset 3"):
        load_splits(DataConfig(path=str(bad)))
    replaced = load_splits(DataConfig(path=str(bad), split=[0.5, 0.5], encoding_errors="replace"))
    assert replaced == {"train": "ok\n", "valid": "\ufffd\n"}


def test_fit_tokenizer(tmp_path: Path):
    tokenizer = fit_tokenizer(DataConfig(level="word", min_freq=2), "a a b\n")
    assert tokenizer.tokens == ["<unk>", "<eos>", "a"]
    with pytest.raises(LmtrainError, match="data.min_freq=2 leaves no token in the vocabulary: the most frequent "
                                           "one in the training text occurs 1 time; lower it"):
        fit_tokenizer(DataConfig(level="word", min_freq=2), "a b\n")


# --- TrainingBatches -------------------------------------------------------------------------------

def test_training_batches_stream(char_tokenizer: Tokenizer, small_text: str):
    batches = TrainingBatches(char_tokenizer, small_text, mode="stream", batch_size=3, bptt=4, seed=1)
    assert batches.carries_state
    expected = batchify(stream_ids(char_tokenizer, small_text), 3)
    assert torch.equal(batches.data, expected)
    assert batches.per_epoch == num_chunks(expected, 4)
    for index in range(batches.per_epoch):
        inputs, targets = batches.batch(0, index)
        assert torch.equal(inputs, get_chunk(expected, index, 4)[0])
        assert torch.equal(targets, get_chunk(expected, index, 4)[1])
        assert torch.equal(batches.batch(5, index)[0], inputs)  # the same every epoch


def test_training_batches_stream_from_ids(char_tokenizer: Tokenizer, small_text: str):
    ids = stream_ids(char_tokenizer, small_text).to(torch.uint8)  # as the token cache gives them
    batches = TrainingBatches(char_tokenizer, ids, mode="stream", batch_size=3, bptt=4, seed=1)
    from_text = TrainingBatches(char_tokenizer, small_text, mode="stream", batch_size=3, bptt=4, seed=1)
    assert batches.per_epoch == from_text.per_epoch
    for index in range(batches.per_epoch):
        inputs, targets = batches.batch(0, index)
        assert inputs.dtype == targets.dtype == torch.long
        assert torch.equal(inputs, from_text.batch(0, index)[0]) and torch.equal(targets, from_text.batch(0, index)[1])


def sentence_text() -> str:
    return "".join(f"{'ab' * (i % 5 + 1)}c\n" for i in range(40)) + "\n"


def test_training_batches_sentences_cover_all_pieces(char_tokenizer: Tokenizer):
    text = sentence_text()
    tokenizer = Tokenizer.fit(text, level="char")
    batches = TrainingBatches(tokenizer, text, mode="sentences", batch_size=6, bptt=8, seed=1)
    assert not batches.carries_state
    pieces = sentence_pieces(tokenizer, text, 8)
    assert batches.per_epoch == -(-len(pieces) // 6)
    got = []
    for index in range(batches.per_epoch):
        inputs, targets = batches.batch(0, index)
        assert inputs.shape == targets.shape and inputs.shape[0] <= 6 and inputs.shape[1] <= 8
        for row_inputs, row_targets in zip(inputs, targets):
            real = row_targets != IGNORE
            got.append((row_inputs[real].tolist(), row_targets[real].tolist()))
            assert (row_inputs[~real] == ZERO_INPUT).all()
    assert sorted(got) == sorted((i.tolist(), t.tolist()) for i, t in pieces)


def epoch(batches: TrainingBatches, number: int) -> list[list[list[int]]]:
    return [batches.batch(number, index)[1].tolist() for index in range(batches.per_epoch)]


def test_training_batches_sentences_order():
    text = sentence_text()
    tokenizer = Tokenizer.fit(text, level="char")
    make = lambda seed: TrainingBatches(tokenizer, text, mode="sentences", batch_size=4, bptt=8, seed=seed)  # noqa: E731
    first, again = make(1), make(1)
    assert epoch(first, 0) == epoch(again, 0)
    assert epoch(first, 3) == epoch(again, 3)
    # A resumed run asking for epoch 3 first sees the same order as one that went through 0..2.
    assert epoch(make(1), 3) == epoch(first, 3)
    assert epoch(first, 0) != epoch(first, 1)
    assert epoch(first, 0) != epoch(make(2), 0)
    assert first.per_epoch == make(2).per_epoch


def test_training_batches_sentences_needs_lines(char_tokenizer: Tokenizer):
    with pytest.raises(LmtrainError, match="no non-empty lines"):
        TrainingBatches(char_tokenizer, "\n\n", mode="sentences", batch_size=2, bptt=4, seed=0)


def test_training_batches_stream_too_short(char_tokenizer: Tokenizer):
    with pytest.raises(LmtrainError, match="too few"):
        TrainingBatches(char_tokenizer, "ab\n", mode="stream", batch_size=4, bptt=4, seed=0)
