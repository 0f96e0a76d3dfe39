"""Reading text and turning it into token ids, as the lecture describes: build a dictionary from the
corpus, map each token to its index, and add `<eos>` to signify the end of a sentence (one per line).

Character level works on Unicode code points (not bytes); word level splits on whitespace. The
vocabulary is fit on the training split only and travels inside every checkpoint (`to_dict`).
A leaf module: it knows nothing of torch or the model.
"""

from __future__ import annotations

import codecs
import errno
import os
import stat
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from lmtrain.errors import LmtrainError

UNK = "<unk>"
EOS = "<eos>"
SPECIALS = (UNK, EOS)  # ids 0 and 1 in every vocabulary
# Not a token: an input id meaning "x(t) is the zero vector", the lecture's first input x(1) = 0.
ZERO_INPUT = -1


def open_corpus(path: str | Path) -> BinaryIO:
    """Open a corpus file for reading bytes; a missing file, a folder, a device (/dev/zero never ends)
    or an unreadable file is an LmtrainError naming it. A pipe is read as it comes (once)."""
    path = Path(path)
    kind = file_kind(path)
    if kind == "missing":
        raise LmtrainError(f"corpus file not found: {path}")
    if kind == "directory":
        raise LmtrainError(f"corpus path is a directory, not a file: {path}")
    if kind not in ("file", "pipe"):
        raise LmtrainError(f"corpus path {path} is a {kind}, not a file of text")
    try:
        return path.open("rb")
    except OSError as error:
        raise LmtrainError(f"cannot read {path}: {error.strerror}") from None


def file_kind(path: str | Path) -> str:
    """What `path` names, links followed: "file", "directory", "pipe", "character device", "block
    device", "socket", "symbolic link loop" or "missing"."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        return "symbolic link loop" if error.errno == errno.ELOOP else "missing"
    for test, kind in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "pipe"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return "special file"


# What to do about undecodable bytes in a corpus, where the config decides how it is read.
CONFIG_REMEDY = "set data.encoding_errors: replace to substitute U+FFFD"


def model_remedy(encoding: str) -> str:
    """What to do about undecodable bytes in a text read for a model, which reads text one way."""
    return f"the model reads text as {encoding} (its data.encoding): convert the file, e.g. iconv -t {encoding}"


def read_text(path: str | Path, *, encoding: str = "utf-8", errors: str = "strict",
              remedy: str = CONFIG_REMEDY) -> str:
    """Read a corpus file as text with '\\n' line ends and no byte-order mark. Every convention is a line
    end, as Python's universal newlines read them: LF, CRLF and a lone CR (classic Mac text).

    Undecodable bytes are an error naming the file, the byte offset and the `remedy`, unless
    `errors="replace"`.
    """
    return "".join(read_text_blocks(path, encoding=encoding, errors=errors, block_bytes=-1, remedy=remedy))


def universal_newlines(text: str) -> str:
    """CRLF and a lone CR as LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def read_text_blocks(path: str | Path, *, encoding: str = "utf-8", errors: str = "strict",
                     block_bytes: int = 1 << 24, remedy: str = CONFIG_REMEDY) -> Iterator[str]:
    """The text `read_text` returns, in pieces, reading `block_bytes` at a time (-1: the whole file at
    once, one piece, perhaps and a last line end): the file is never held whole.

    A character cut between two blocks is completed by the incremental decoder; a "\\r" at the end of
    a block waits for the next one, in case a "\\n" follows it (CRLF is one line end, a lone CR another).
    """
    fed, carried, started = 0, "", False  # bytes given to the decoder; a held-back "\\r"; text seen yet
    with open_corpus(path) as file:
        try:
            b"\n".decode(encoding, "replace")  # a LookupError for a codec that is no text encoding (rot13)
            decoder = codecs.getincrementaldecoder(encoding)(errors=errors)
        except LookupError:
            raise LmtrainError(f"unknown text encoding {encoding!r} (data.encoding)") from None
        except UnicodeError:  # a codec that is not for files of text (idna)
            raise LmtrainError(f"{encoding!r} is not an encoding of text files (data.encoding)") from None
        while True:
            try:
                raw = file.read(block_bytes)
            except OSError as error:
                raise LmtrainError(f"cannot read {path}: {error.strerror}") from None
            waiting = len(decoder.getstate()[0])  # bytes of an unfinished character, before `raw`
            try:
                text = carried + decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as error:
                raise _decode_error(path, encoding, fed - waiting + error.start, remedy) from None
            except UnicodeError as error:  # a codec's own complaint, without an offset (UTF-16 with no BOM)
                raise LmtrainError(f"{path} cannot be read as {encoding}: {error}") from None
            fed += len(raw)
            if not started and text:
                text, started = text.removeprefix("\ufeff"), True
            carried = "\r" if raw and text.endswith("\r") else ""
            text = text[: len(text) - len(carried)]
            text = universal_newlines(text)
            if text:
                yield text
            if not raw:
                return


def _decode_error(path: str | Path, encoding: str, offset: int, remedy: str) -> LmtrainError:
    return LmtrainError(f"{path}: byte offset {offset} is not valid {encoding} ({remedy})")


def split_lines(text: str) -> list[str]:
    """Lines of `text`; a final newline does not start another line. (Not `str.splitlines`, which
    also breaks on form feeds and U+2028 inside a line.)"""
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


@dataclass
class Tokenizer:
    """Maps text to ids and back. `tokens[i]` is the token of id i; ids 0 and 1 are `<unk>`, `<eos>`."""

    level: str                         # "char" | "word"
    eos: str                           # "line": <eos> ends every line | "none"
    tokens: list[str]
    ids: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.level not in ("char", "word") or self.eos not in ("line", "none"):
            raise LmtrainError(f"tokenizer level and eos must be char or word, line or none; got "
                               f"{str(self.level)[:20]!r}, {str(self.eos)[:20]!r}")
        if tuple(self.tokens[:2]) != SPECIALS:
            raise LmtrainError("tokenizer vocabulary must start with <unk>, <eos>")
        odd = next((token for token in self.tokens if not isinstance(token, str) or not token), None)
        if odd is not None or len(set(self.tokens)) != len(self.tokens):
            raise LmtrainError(f"tokenizer vocabulary must be distinct, non-empty strings; it holds "
                               f"{'a repeated token' if odd is None else repr(odd)[:20]}")
        self.ids = {token: index for index, token in enumerate(self.tokens)}

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def unk_id(self) -> int:
        return 0

    @property
    def eos_id(self) -> int:
        return 1

    @classmethod
    def fit(cls, text: str, *, level: str, eos: str = "line", min_freq: int = 1,
            max_vocab: int | None = None) -> Tokenizer:
        """Build the vocabulary from (training) text: tokens seen at least `min_freq` times, the most
        frequent first, cut to `max_vocab` entries including the specials."""
        counts = _char_counts(text, eos) if level == "char" else Counter(
            token for line in _units(text, level, eos) for token in line)
        return cls.from_counts(counts, level=level, eos=eos, min_freq=min_freq, max_vocab=max_vocab)

    @classmethod
    def from_counts(cls, counts: Mapping[str, int], *, level: str, eos: str = "line", min_freq: int = 1,
                    max_vocab: int | None = None) -> Tokenizer:
        """The vocabulary `fit` builds from text whose token counts are `counts` (`<eos>` counted once a
        line): so a corpus counted in pieces gets the same vocabulary as one read whole."""
        counts = {token: count for token, count in counts.items() if token not in SPECIALS}
        kept = [token for token, count in counts.items() if count >= min_freq]
        kept.sort(key=lambda token: (-counts[token], token))
        if max_vocab is not None:
            kept = kept[: max_vocab - len(SPECIALS)]
        if level == "char":
            kept.sort()  # code-point order reads better in `lmtrain info`; frequency only chose them
        return cls(level=level, eos=eos, tokens=[*SPECIALS, *kept])

    def encode(self, text: str) -> list[int]:
        """All of `text` as one id stream, `<eos>` after every line when `eos == "line"`."""
        return [token_id for line in self.encode_lines(text) for token_id in line]

    def encode_lines(self, text: str) -> list[list[int]]:
        """One id list per line (each ending in `<eos>`); with `eos == "none"`, a single list."""
        get = self.ids.get
        return [[get(token, 0) for token in line] for line in _units(text, self.level, self.eos)]

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`: `<eos>` becomes a line end; words are joined by single spaces; a character
        model's `<unk>` is shown as U+FFFD."""
        parts: list[str] = []
        for token_id in ids:
            token = self.tokens[token_id]
            if token == EOS and self.eos == "line":
                parts.append("\n")
            elif token == UNK and self.level == "char":
                parts.append("\ufffd")  # one character, as it stood for one
            elif self.level == "word" and parts and parts[-1] != "\n":
                parts.append(" " + token)
            else:
                parts.append(token)
        return "".join(parts)

    def count_unknown(self, text: str) -> tuple[int, int]:
        """(tokens not in the vocabulary, all tokens) of `text`; a literal `<unk>` counts as known."""
        if self.level == "char":  # counted in C, without a list of every character (a corpus may be one 50 MB line)
            counts = _char_counts(text, self.eos)
            return sum(n for token, n in counts.items() if token not in self.ids), sum(counts.values())
        total = unknown = 0
        for line in _units(text, self.level, self.eos):
            total += len(line)
            unknown += sum(1 for token in line if token not in self.ids)
        return unknown, total

    def to_dict(self) -> dict:
        return {"level": self.level, "eos": self.eos, "tokens": list(self.tokens)}

    @classmethod
    def from_dict(cls, state: dict) -> Tokenizer:
        return cls(level=state["level"], eos=state["eos"], tokens=list(state["tokens"]))


def _char_counts(text: str, eos: str) -> Counter:
    """How often each character token occurs; with `eos == "line"` line ends count as `<eos>`."""
    counts = Counter(text)
    if eos == "line":
        counts.pop("\n", None)
        lines = text.count("\n") + (1 if text and not text.endswith("\n") else 0)
        if lines:
            counts[EOS] = lines
    return counts


def _units(text: str, level: str, eos: str) -> list[list[str]]:
    """The text as lists of token strings: one list per line ending in `<eos>`, or one list."""
    if eos == "none":
        return [list(text) if level == "char" else text.split()]
    if level == "char":
        return [[*line, EOS] for line in split_lines(text)]
    return [[*line.split(), EOS] for line in split_lines(text)]
