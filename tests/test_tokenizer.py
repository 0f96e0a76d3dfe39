"""lmtrain.data.tokenizer: code-point round trips, one <eos> per line, vocabulary fit on training text only."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmtrain.data.tokenizer import EOS, SPECIALS, UNK, ZERO_INPUT, Tokenizer, read_text, read_text_blocks, split_lines
from lmtrain.errors import LmtrainError

UNICODE_TEXTS = [
    "hello world\n",
    "a\n\nb\n",
    "\n",
    "naïve café — “quotes”\n",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧\n",
    "中文字符，日本語のテキスト\n한국어\n",
    "combining: e\u0301 a\u0308 n\u0303\n",
    "tabs\tand\u00a0nbsp\u2028line sep inside\n",
    "form\x0cfeed\n",
]


# --- character level -------------------------------------------------------------------------------

@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_char_round_trip(text: str):
    tokenizer = Tokenizer.fit(text, level="char")
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_char_tokens_are_code_points_not_bytes():
    text = "😀e\u0301中\n"
    tokenizer = Tokenizer.fit(text, level="char")
    assert tokenizer.tokens == [UNK, EOS, "e", "\u0301", "中", "😀"]  # code-point order after the specials
    ids = tokenizer.encode(text)
    assert len(ids) == 5  # four code points and <eos>
    assert [tokenizer.tokens[i] for i in ids] == ["😀", "e", "\u0301", "中", EOS]


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_exactly_one_eos_per_line(text: str):
    tokenizer = Tokenizer.fit(text, level="char")
    ids = tokenizer.encode(text)
    assert ids.count(tokenizer.eos_id) == text.count("\n")
    assert ids[-1] == tokenizer.eos_id
    lines = tokenizer.encode_lines(text)
    assert len(lines) == text.count("\n")
    assert all(line.count(tokenizer.eos_id) == 1 and line[-1] == tokenizer.eos_id for line in lines)


def test_last_line_without_newline_gets_eos():
    tokenizer = Tokenizer.fit("ab\ncd", level="char")
    ids = tokenizer.encode("ab\ncd")
    assert ids.count(tokenizer.eos_id) == 2
    assert tokenizer.decode(ids) == "ab\ncd\n"


def test_eos_none_keeps_newline_as_a_char():
    text = "ab\nc\n\n"
    tokenizer = Tokenizer.fit(text, level="char", eos="none")
    assert "\n" in tokenizer.tokens
    ids = tokenizer.encode(text)
    assert tokenizer.eos_id not in ids
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode_lines(text) == [ids]
    # Without <eos> even a text not ending in a newline round-trips.
    assert tokenizer.decode(tokenizer.encode("ba\nc")) == "ba\nc"


def test_carriage_return_is_an_ordinary_char():
    tokenizer = Tokenizer.fit("a\rb\n", level="char")
    assert "\r" in tokenizer.tokens
    assert tokenizer.decode(tokenizer.encode("a\rb\n")) == "a\rb\n"


def test_split_lines():
    assert split_lines("") == []
    assert split_lines("\n") == [""]
    assert split_lines("a\nb") == ["a", "b"]
    assert split_lines("a\nb\n") == ["a", "b"]
    assert split_lines("a\x0cb\u2028c\n") == ["a\x0cb\u2028c"]  # only "\n" ends a line


def test_special_ids_and_vocab_size(char_tokenizer: Tokenizer):
    assert char_tokenizer.tokens[:2] == list(SPECIALS)
    assert (char_tokenizer.unk_id, char_tokenizer.eos_id) == (0, 1)
    assert char_tokenizer.vocab_size == len(char_tokenizer.tokens) == len(set(char_tokenizer.tokens))
    assert ZERO_INPUT < 0  # never a real id


def test_vocabulary_must_start_with_specials():
    with pytest.raises(LmtrainError, match="must start with <unk>, <eos>"):
        Tokenizer(level="char", eos="line", tokens=["a", UNK, EOS])


# --- word level ------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, shown", [(["a", 7], "7"), (["a", ""], "''"), (["a", "a"], "a repeated token")])
def test_vocabulary_must_be_distinct_nonempty_strings(extra: list, shown: str):
    with pytest.raises(LmtrainError, match=f"distinct, non-empty strings; it holds {shown}$"):
        Tokenizer(level="char", eos="line", tokens=[*SPECIALS, *extra])


def test_word_encode_decode(word_tokenizer: Tokenizer, small_text: str):
    ids = word_tokenizer.encode("the cat ran\n")
    assert [word_tokenizer.tokens[i] for i in ids] == ["the", "cat", "ran", EOS]
    assert word_tokenizer.decode(ids) == "the cat ran\n"
    # Whitespace is normalised to single spaces; otherwise the text comes back.
    assert word_tokenizer.decode(word_tokenizer.encode("the   cat\tsat \na dog\n")) == "the cat sat\na dog\n"


def test_word_vocab_most_frequent_first():
    tokenizer = Tokenizer.fit("b a c a b a\n", level="word")
    assert tokenizer.tokens == [UNK, EOS, "a", "b", "c"]


def test_min_freq_makes_rare_words_unknown():
    text = "a a a b b c\n"
    tokenizer = Tokenizer.fit(text, level="word", min_freq=2)
    assert tokenizer.tokens == [UNK, EOS, "a", "b"]
    assert tokenizer.encode(text) == [2, 2, 2, 3, 3, 0, 1]
    assert tokenizer.decode(tokenizer.encode(text)) == "a a a b b <unk>\n"


def test_max_vocab_counts_the_specials():
    text = "a a a b b c d\n"
    tokenizer = Tokenizer.fit(text, level="word", max_vocab=4)
    assert tokenizer.tokens == [UNK, EOS, "a", "b"]
    assert tokenizer.encode("c d a\n") == [0, 0, 2, 1]


def test_max_vocab_ties_broken_alphabetically():
    tokenizer = Tokenizer.fit("z y x\n", level="word", max_vocab=4)
    assert tokenizer.tokens == [UNK, EOS, "x", "y"]


def test_char_max_vocab_keeps_most_frequent_in_code_point_order():
    tokenizer = Tokenizer.fit("zzzyyxa\n", level="char", max_vocab=4)
    assert tokenizer.tokens == [UNK, EOS, "y", "z"]


def test_literal_unk_maps_to_unk_id():
    text = "a <unk> b\n<unk>\n"
    tokenizer = Tokenizer.fit(text, level="word")
    assert tokenizer.tokens.count(UNK) == 1  # not added twice
    assert tokenizer.encode(text) == [tokenizer.ids["a"], 0, tokenizer.ids["b"], 1, 0, 1]
    assert tokenizer.count_unknown(text) == (0, 6)


def test_vocab_fit_on_training_text_only():
    train = "the cat sat\n"
    tokenizer = Tokenizer.fit(train, level="word")
    assert "dog" not in tokenizer.tokens
    assert tokenizer.encode("the dog sat\n") == [tokenizer.ids["the"], 0, tokenizer.ids["sat"], 1]
    char = Tokenizer.fit("abc\n", level="char")
    assert char.encode("abz\n") == [char.ids["a"], char.ids["b"], 0, 1]


def test_count_unknown():
    tokenizer = Tokenizer.fit("the cat sat\n", level="word")
    assert tokenizer.count_unknown("the dog sat on it\n") == (3, 6)  # 5 words and <eos>
    assert tokenizer.count_unknown("the cat\n") == (0, 3)
    assert tokenizer.count_unknown("") == (0, 0)
    char = Tokenizer.fit("abc\n", level="char")
    assert char.count_unknown("abcd😀\n") == (2, 6)


def test_word_eos_none():
    tokenizer = Tokenizer.fit("a b\nc\n", level="word", eos="none")
    assert tokenizer.encode("a b\nc\n") == [tokenizer.ids[w] for w in "abc"]
    assert tokenizer.decode(tokenizer.encode("a b\nc\n")) == "a b c"


def test_word_blank_lines_keep_their_eos(word_tokenizer: Tokenizer):
    assert word_tokenizer.encode("\n\nthe\n") == [1, 1, word_tokenizer.ids["the"], 1]
    assert word_tokenizer.decode([1, 1, word_tokenizer.ids["the"], 1]) == "\n\nthe\n"


# --- serialisation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("level, eos", [("char", "line"), ("char", "none"), ("word", "line")])
def test_dict_round_trip(small_text: str, level: str, eos: str):
    tokenizer = Tokenizer.fit(small_text + "ünï 😀\n", level=level, eos=eos)
    state = tokenizer.to_dict()
    assert set(state) == {"level", "eos", "tokens"}
    state["tokens"].append("mutated")  # a copy, not the tokenizer's own list
    assert "mutated" not in tokenizer.tokens
    again = Tokenizer.from_dict(tokenizer.to_dict())
    assert again == tokenizer
    assert again.ids == tokenizer.ids
    assert again.encode(small_text) == tokenizer.encode(small_text)


# --- reading files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("data, text", [
    (b"one\ntwo\nthree\n", "one\ntwo\nthree\n"),                 # LF (Unix)
    (b"one\r\ntwo\r\nthree\r\n", "one\ntwo\nthree\n"),           # CRLF (Windows)
    (b"one\rtwo\rthree\r", "one\ntwo\nthree\n"),                 # a lone CR (classic Mac, some e-book dumps)
    (b"one\r\ntwo\rthree\nfour", "one\ntwo\nthree\nfour"),        # mixed, no final line end
    (b"a\r\r\nb\n\rc", "a\n\nb\n\nc"),                          # CR then CRLF: two line ends; LF then CR too
    ("\ufeffone\r\ntwo".encode("utf-8"), "one\ntwo"),              # a byte-order mark dropped
])
def test_read_text_reads_every_line_end_convention(tmp_path: Path, data: bytes, text: str):
    path = tmp_path / "c.txt"
    path.write_bytes(data)
    assert read_text(path) == text
    assert split_lines(read_text(path)) == text.removesuffix("\n").split("\n")
    for block_bytes in (1, 2, 3, 1 << 20):  # a CRLF or a CR cut between two blocks
        assert read_in_blocks(path, block_bytes) == text


def test_read_text_keeps_a_bom_that_is_not_first(tmp_path: Path):
    path = tmp_path / "c.txt"
    path.write_bytes("a\ufeffb\n".encode("utf-8"))
    assert read_text(path) == "a\ufeffb\n"


def test_read_text_undecodable_bytes_name_file_and_offset(tmp_path: Path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"hello\n\xffworld\n")
    with pytest.raises(LmtrainError) as caught:
        read_text(path)
    message = str(caught.value)
    assert str(path) in message and "byte offset 6" in message and "utf-8" in message
    assert "\n" not in message


def test_read_text_replace_substitutes_fffd(tmp_path: Path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"hello\n\xffworld\n")
    assert read_text(path, errors="replace") == "hello\n\ufffdworld\n"


def test_read_text_other_encoding(tmp_path: Path):
    path = tmp_path / "latin.txt"
    path.write_bytes("café\n".encode("latin-1"))
    assert read_text(path, encoding="latin-1") == "café\n"
    with pytest.raises(LmtrainError, match="unknown text encoding 'no-such-codec'"):
        read_text(path, encoding="no-such-codec")


def test_read_text_missing_file(tmp_path: Path):
    with pytest.raises(LmtrainError, match="corpus file not found"):
        read_text(tmp_path / "missing.txt")


def test_read_text_directory(tmp_path: Path):
    with pytest.raises(LmtrainError, match="is a directory"):
        read_text(tmp_path)


# --- reading files in blocks: the same text, the same errors ------------------------------------------

def read_in_blocks(path: Path, block_bytes: int, **options) -> str:
    return "".join(read_text_blocks(path, block_bytes=block_bytes, **options))


@pytest.mark.parametrize("data, options", [
    ("\ufeffone\r\ntwo\rthree\r\n\r\r\n".encode("utf-8"), {}),          # BOM, CRLF, lone CR, CR CR LF
    ("naïve 日本語 ü\nlast line without newline".encode("utf-8"), {}),  # 2- and 3-byte characters
    (b"ok\n\xfe\nhalf \xe2\x82\nend \xe2", {"errors": "replace"}),       # undecodable and cut-off bytes
    ("\ufeffcafé\r\n".encode("utf-16"), {"encoding": "utf-16"}),           # a BOM the codec itself reads
    ("café\n".encode("latin-1"), {"encoding": "latin-1"}),
    (b"", {}),
])
def test_read_text_blocks_join_to_read_text(tmp_path: Path, data: bytes, options: dict):
    path = tmp_path / "c.txt"
    path.write_bytes(data)
    for block_bytes in (1, 2, 3, 5, 1 << 20):
        assert read_in_blocks(path, block_bytes, **options) == read_text(path, **options)


def test_read_text_blocks_name_the_same_byte_offset(tmp_path: Path):
    path = tmp_path / "bad.txt"
    path.write_bytes("héllo\nwörld\n".encode("utf-8") + b"\xff\n")
    with pytest.raises(LmtrainError) as whole:
        read_text(path)
    for block_bytes in (1, 2, 4, 7):
        with pytest.raises(LmtrainError) as blocks:
            read_in_blocks(path, block_bytes)
        assert str(blocks.value) == str(whole.value)


def test_read_text_blocks_errors(tmp_path: Path):
    with pytest.raises(LmtrainError, match="corpus file not found"):
        read_in_blocks(tmp_path / "missing.txt", 4)
    with pytest.raises(LmtrainError, match="is a directory"):
        read_in_blocks(tmp_path, 4)
    (tmp_path / "c.txt").write_text("a\n", encoding="utf-8")
    for encoding in ("no-such-codec", "rot13"):  # rot13 is a codec, but not a text encoding
        with pytest.raises(LmtrainError, match=f"unknown text encoding '{encoding}'"):
            read_in_blocks(tmp_path / "c.txt", 4, encoding=encoding)


def test_from_counts_is_what_fit_builds(small_text: str):
    from collections import Counter
    counts = Counter(small_text.split())
    counts[EOS] = small_text.count("\n")
    assert Tokenizer.from_counts(counts, level="word") == Tokenizer.fit(small_text, level="word")
    assert Tokenizer.from_counts({**counts, UNK: 99}, level="word", max_vocab=4).tokens == [UNK, EOS, "the", "cat"]


# --- property test ---------------------------------------------------------------------------------

def test_char_round_trip_property(tmp_path: Path):
    hypothesis = pytest.importorskip("hypothesis")
    strategies = pytest.importorskip("hypothesis.strategies")
    configuration = pytest.importorskip("hypothesis.configuration")

    # Any code point but surrogates (not encodable text) and "\r".
    body = strategies.text(alphabet=strategies.characters(exclude_categories=("Cs",), exclude_characters="\r"))

    @hypothesis.settings(max_examples=200, deadline=None, derandomize=True, database=None)
    @hypothesis.given(body)
    def round_trip(text: str) -> None:
        text += "\n"
        tokenizer = Tokenizer.fit(text, level="char")
        ids = tokenizer.encode(text)
        assert tokenizer.unk_id not in ids  # fit on this very text: nothing is unknown
        assert tokenizer.decode(ids) == text
        assert ids.count(tokenizer.eos_id) == text.count("\n")

    # Hypothesis caches into ./.hypothesis: keep the repository clean.
    configuration.set_hypothesis_home_dir(tmp_path / ".hypothesis")
    try:
        round_trip()
    finally:
        configuration.set_hypothesis_home_dir(None)


def test_file_kinds_and_what_a_corpus_may_be(tmp_path: Path):
    import os

    from lmtrain.data.tokenizer import file_kind, open_corpus

    (tmp_path / "c.txt").write_text("a\n")
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "loop").symlink_to("loop")
    assert [file_kind(tmp_path / name) for name in ("c.txt", "pipe", "loop", "missing")] == [
        "file", "pipe", "symbolic link loop", "missing"]
    assert file_kind(tmp_path) == "directory" and file_kind("/dev/zero") == "character device"
    with pytest.raises(LmtrainError, match="corpus path /dev/zero is a character device, not a file of text"):
        open_corpus("/dev/zero")
