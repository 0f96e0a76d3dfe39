"""The token cache: a corpus is tokenized once, and every later run maps the ids from disk.

Stream mode only (`data.mode: stream`, `data.cache: true`); sentences mode reads the text into
memory. An entry lives in `<cache>/tokens/` (`corpora.cache_dir()`: `$LMTRAIN_CACHE` or `~/.cache/lmtrain`):

    <key>.ids     the id streams of train, valid[, test] back to back, each as `stream_ids` makes it,
                  in the smallest of uint8 / uint16 / uint32 that holds the vocabulary
    <key>.json    what the entry holds: vocabulary, dtype, split lengths, unknown-token counts.
                  Written last, after the ids file is complete and renamed into place: an
                  interrupted tokenization never leaves an entry that looks valid.
    files/<hash of a corpus path>.json   the file's size, times and inode -> its content digest

key = sha256 of (format version, content digest of every corpus file, tokenizer and split settings,
and a checkpoint's vocabulary when one is given). Hashing a large corpus takes time, so a file whose size,
mtime, ctime and inode match its `files/` record is not hashed again: a file rewritten in place that
keeps all four is not noticed (`touch` alone cannot restore a ctime). Knows tokens, not models.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from lmtrain.config import DataConfig
from lmtrain.data.corpora import cache_dir
from lmtrain.data.dataset import line_count, reverse_text, reversed_stream
from lmtrain.data.encoding import (
    LONG_LINE,
    SPLITS,
    encode_pieces,
    fit_tokenizer,
    load_splits,
    split_texts,
    text_length,
    with_corpus_files,
)
from lmtrain.data.tokenizer import Tokenizer, open_corpus
from lmtrain.errors import LmtrainError, os_reason
from lmtrain.files import atomic_write, replacing_held

FORMAT = 2  # 2: a lone CR is a line end
HASH_BLOCK = 1 << 24
DTYPES = {"uint8": torch.uint8, "uint16": torch.uint16, "uint32": torch.uint32}
Echo = Callable[[str], None]


def _quiet(line: str) -> None:
    """The default for progress lines and warnings: a library does not print."""


class CacheUnwritable(Exception):
    """The cache folder cannot take a new entry (read-only, full): train from memory instead."""


class MappedFile:
    """A file this process has memory-mapped, watched for another process shrinking it.

    Where Linux allows it, a read lease (fcntl F_SETLEASE): another process that opens the file to
    write or truncates it waits, up to /proc/sys/fs/lease-break-time (45 s), until this one lets go,
    and `check` sees the lease being broken, lets go and raises, so that no read of the mapping is ever
    under way when the file shrinks. Elsewhere (NFS, another OS, a thread that cannot take signals)
    `check` compares the size, which leaves the moment between a check and a read unguarded."""

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size, self.lease = path, size, _read_lease(path)

    def check(self) -> None:
        if self.lease is not None and fcntl.fcntl(self.lease, fcntl.F_GETLEASE) != fcntl.F_RDLCK:
            self.release()
            raise self._changed("another process is writing or truncating it")
        try:
            now = self.path.stat().st_size
        except OSError:
            return  # deleted: the mapping keeps the old inode's pages, reading them is safe
        if now < self.size:
            self.release()
            raise self._changed(f"it shrank from {self.size:,} to {now:,} bytes (another process)")

    def release(self) -> None:
        if self.lease is not None:
            os.close(self.lease)  # the waiting process goes on
            self.lease = None

    __del__ = release

    def _changed(self, what: str) -> LmtrainError:
        return LmtrainError(f"the token cache file {self.path} changed while it was in use: {what}; the corpus "
                            f"is read again with --resume")


def _read_lease(path: Path) -> int | None:
    """A descriptor holding a read lease on `path`, or None where none can be had."""
    if not hasattr(fcntl, "F_SETLEASE") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        # The lease's notice is SIGIO, whose default action ends the process: `check` polls instead.
        if signal.getsignal(signal.SIGIO) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGIO, signal.SIG_IGN)
        descriptor = os.open(path, os.O_RDONLY)
    except (OSError, ValueError):
        return None
    try:
        fcntl.fcntl(descriptor, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError:  # not the file's owner, NFS, a file open for writing somewhere
        os.close(descriptor)
        return None
    return descriptor


@dataclass
class Corpus:
    """A corpus ready to train on: its tokenizer, and each split either as text or, read from the
    token cache, as its id stream already (`stream_ids` of the text, memory-mapped)."""

    tokenizer: Tokenizer
    splits: dict[str, str | Tensor]               # "train", "valid"[, "test"]
    unknown: dict[str, tuple[int, int]]           # valid/test: (tokens not in the vocabulary, all tokens)
    mapped: MappedFile | None = None              # the ids file the splits are mapped from

    def unknown_warnings(self) -> list[str]:
        """One warning line per evaluation split with tokens the training vocabulary lacks."""
        return [f"warning: {unknown:,} of {total:,} {split} tokens ({100 * unknown / max(total, 1):.2f}%) are not in "
                f"the training vocabulary and count as <unk>"
                for split, (unknown, total) in self.unknown.items() if unknown]

    def line_end_warnings(self) -> list[str]:
        """A warning for `data.eos: line` on a training text without line ends, which is then one line."""
        if self.tokenizer.eos == "line" and line_count(self.splits["train"], self.tokenizer.eos_id) <= 1:
            return ["warning: the training text has no line ends, so with data.eos: line it is one line that ends "
                    "in one <eos>; for text without line structure, data.eos: none"]
        return []

    def check_mapped(self) -> None:
        """Raise if another process is changing the mapped ids file: reading a page past a shrunk file's
        end would kill this process with SIGBUS and no word. Call it before reading the splits."""
        if self.mapped is not None:
            self.mapped.check()

    def view(self, split: str, *, right_to_left: bool = False) -> str | Tensor:
        """A split as it is read forward, or right to left for the right-to-left LM of `direction: bi`."""
        data, eos = self.splits[split], self.tokenizer.eos
        if not right_to_left:
            return data
        if isinstance(data, str):
            return reverse_text(data, level=self.tokenizer.level, eos=eos)
        return reversed_stream(data, eos=eos)


def corpus_in_memory(config: DataConfig, *, tokenizer: Tokenizer | None = None) -> Corpus:
    """The corpus read whole into memory: its split texts, and the vocabulary fit on the training text
    (or `tokenizer`, e.g. a checkpoint's)."""
    texts = load_splits(config)
    tokenizer = tokenizer or fit_tokenizer(config, texts["train"])
    unknown = {split: tokenizer.count_unknown(texts[split]) for split in ("valid", "test") if split in texts}
    return Corpus(tokenizer, dict(texts), unknown)


def load_corpus(config: DataConfig, *, tokenizer: Tokenizer | None = None, echo: Echo = _quiet,
                warn: Echo = _quiet) -> Corpus:
    """The corpus to train on: through the token cache in stream mode with `data.cache` (tokenized
    and stored on first use), else read whole into memory. `tokenizer`: a checkpoint's, which wins
    over the vocabulary the corpus would give (exact resume)."""
    if not (config.cache and config.mode == "stream"):
        return corpus_in_memory(config, tokenizer=tokenizer)
    try:
        return cached_corpus(config, tokenizer=tokenizer, echo=echo, warn=warn)
    except CacheUnwritable as error:
        warn(f"warning: {error}; reading the corpus into memory instead (data.cache: false skips the cache)")
        return corpus_in_memory(config, tokenizer=tokenizer)


def cached_corpus(config: DataConfig, *, tokenizer: Tokenizer | None = None, echo: Echo = _quiet,
                  warn: Echo = _quiet, folder: Path | None = None) -> Corpus:
    """The corpus from its cache entry, built first when there is none (or a damaged one)."""
    folder = folder or cache_dir() / "tokens"
    config = with_corpus_files(config)
    sources = {role: Path(path) for role in ("path", *SPLITS) if (path := getattr(config, role)) is not None}
    signatures = {role: file_signature(path) for role, path in sources.items()}
    digests = {role: content_digest(path, folder) for role, path in sources.items()}
    key = entry_key(config, digests)
    corpus = read_entry(folder, key, warn=warn)
    if tokenizer is not None and (corpus is None or corpus.tokenizer.tokens != tokenizer.tokens):
        # The checkpoint's vocabulary is authoritative: ids made with it, under a key of their own.
        key = entry_key(config, digests, vocabulary=tokenizer)
        corpus = read_entry(folder, key, warn=warn)
    if corpus is None:
        write_entry(folder, key, config, tokenizer=tokenizer, signatures=signatures, echo=echo)
        corpus = read_entry(folder, key, warn=warn)
    if corpus is None:
        raise CacheUnwritable(f"the token cache {folder} did not keep the new entry {key}")
    return corpus


def entry_key(config: DataConfig, digests: dict[str, str], *, vocabulary: Tokenizer | None = None) -> str:
    """The name of the entry for these files and settings: anything that changes the ids changes it."""
    settings = {"format": FORMAT, "files": digests, "level": config.level, "eos": config.eos,
                "min_freq": config.min_freq, "max_vocab": config.max_vocab, "encoding": config.encoding,
                "encoding_errors": config.encoding_errors, "long_line": LONG_LINE,
                "split": config.split if config.path is not None else None,
                "vocabulary": vocabulary.to_dict() if vocabulary is not None else None}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:40]


def smallest_dtype(vocab_size: int) -> torch.dtype:
    """uint8 up to 256 tokens, uint16 up to 65,536, else uint32."""
    return torch.uint8 if vocab_size <= 1 << 8 else torch.uint16 if vocab_size <= 1 << 16 else torch.uint32


# -- knowing a file by its content ------------------------------------------------------------------

def file_signature(path: Path) -> list[int]:
    """What changes when a file is written: size, modification and change times, inode, device."""
    open_corpus(path).close()  # a missing, unreadable or folder path: the same error as reading it
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]


def content_digest(path: Path, folder: Path) -> str:
    """sha256 of the file's bytes; taken from its `files/` record when its signature still matches."""
    path = path.resolve()
    record_path = folder / "files" / f"{hashlib.sha256(os.fsencode(path)).hexdigest()[:40]}.json"
    signature = file_signature(path)
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record["path"] == str(path) and record["signature"] == signature:
            return record["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no record, or a damaged one: hash the file
    record = {"path": str(path), "signature": signature, "sha256": hash_file(path)}
    try:
        record_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(record_path, json.dumps(record).encode())
    except OSError:
        pass  # only a speed-up: a read-only cache hashes every time
    return record["sha256"]


def data_fingerprints(config: DataConfig, folder: Path | None = None,
                      roles: Iterable[str] = ("path", *SPLITS)) -> dict[str, dict[str, Any]]:
    """{role: {"path", "size", "sha256"}} for every corpus file of `config` (`data.path` or
    train/valid/test, a downloaded corpus's files included), or those of `roles` only: what a checkpoint
    records so that `--resume` can tell the data it trained on from changed data. The hash is the token
    cache's, kept per file while its size and times stay the same, so a start reads each file at most once."""
    folder = folder or cache_dir() / "tokens"
    config = with_corpus_files(config)
    fingerprints = {}
    for role in roles:
        if (path := getattr(config, role)) is not None:
            path = Path(path)
            digest = content_digest(path, folder)  # a missing or unreadable file: the error reading it gives
            fingerprints[role] = {"path": str(path), "size": path.stat().st_size, "sha256": digest}
    return fingerprints


def changed_files(saved: dict[str, dict[str, Any]], now: dict[str, dict[str, Any]]) -> list[str]:
    """What differs between two `data_fingerprints`, one phrase per file (empty: the same data)."""
    changes = []
    for role in sorted(set(saved) | set(now)):
        before, after = saved.get(role), now.get(role)
        if before is None or after is None:
            changes.append(f"data.{role} {'added' if before is None else 'removed'}")
        elif before.get("sha256") != after["sha256"]:
            sizes = (f"{before['size']:,} -> {after['size']:,} bytes" if before.get("size") != after["size"]
                     else "same size, other bytes")
            changes.append(f"data.{role} {after['path']} ({sizes})")
    return changes


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open_corpus(path) as file:
        while block := file.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


# -- reading and writing entries ----------------------------------------------------------------------

def read_entry(folder: Path, key: str, *, warn: Echo) -> Corpus | None:
    """The entry's corpus, its ids memory-mapped (read lazily, never copied); None when there is no
    entry, or a damaged one (with a warning: it is then built again)."""
    record_path, ids_path = folder / f"{key}.json", folder / f"{key}.ids"
    if not record_path.exists():
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        return _corpus_from(record, key, ids_path)
    except (OSError, ValueError, KeyError, TypeError, IndexError, LmtrainError) as error:
        warn(f"warning: the token cache entry {record_path} is damaged ({_reason(error)}); tokenizing the corpus again")
        return None


def _corpus_from(record: dict, key: str, ids_path: Path) -> Corpus:
    """The corpus an entry's record describes, after checking the record against the ids file."""
    if record["format"] != FORMAT or record["key"] != key:
        raise ValueError("another format or key")
    tokenizer = Tokenizer.from_dict(record["tokenizer"])
    dtype = DTYPES[record["dtype"]]
    if dtype != smallest_dtype(tokenizer.vocab_size):
        raise ValueError(f"dtype {record['dtype']} for {tokenizer.vocab_size} tokens")
    splits = [(str(name), int(length), missing) for name, length, missing in record["splits"]]
    total = sum(length for _, length, _ in splits)
    expected, found = total * torch.empty(0, dtype=dtype).element_size(), ids_path.stat().st_size
    if total <= 0 or found != expected:
        raise ValueError(f"{ids_path.name} holds {found} bytes, not {expected}")
    ids = torch.from_file(str(ids_path), shared=False, size=total, dtype=dtype)  # mapped, read on demand
    for start in range(0, total, 1 << 24):  # a damaged file of the right size: ids past the vocabulary
        if int(ids[start:start + (1 << 24)].to(torch.int32).max()) >= tokenizer.vocab_size:
            raise ValueError(f"{ids_path.name} holds ids past the vocabulary of {tokenizer.vocab_size}")
    streams, unknown, offset = {}, {}, 0
    for name, length, missing in splits:
        streams[name] = ids[offset:offset + length]
        if length < 1 or int(streams[name][0]) != tokenizer.eos_id:
            raise ValueError(f"the {name} stream does not start with <eos>")
        if name != "train":
            unknown[name] = (int(missing), length - 1)  # every token but the leading <eos>
        offset += length
    if "train" not in streams or "valid" not in streams:
        raise ValueError("no train or no valid stream")
    return Corpus(tokenizer, streams, unknown, mapped=MappedFile(ids_path, found))


def write_entry(folder: Path, key: str, config: DataConfig, *, tokenizer: Tokenizer | None,
                signatures: dict[str, list[int]], echo: Echo) -> None:
    """Tokenize the corpus into a new entry: pass 1 counts the vocabulary on the training split
    (unless `tokenizer` is given), pass 2 writes the ids. The ids go to a temporary file that is
    renamed into place (if the corpus did not change meanwhile), and the record is written after it."""
    begin = time.perf_counter()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Opened before the passes: a read-only cache is found out at once.
        with replacing_held(folder / f"{key}.ids") as file:  # a killed run's leftover goes at the next
            characters = text_length(config.path, encoding=config.encoding, errors=config.encoding_errors) \
                if config.path is not None else None  # the cuts between the splits depend on it
            tokenizer = tokenizer or fit_tokenizer(config, next(split_texts(config, length=characters))[1])
            dtype = smallest_dtype(tokenizer.vocab_size)
            splits = [_write_split(file, name, pieces, tokenizer, dtype)
                      for name, pieces in split_texts(config, length=characters)]
            if {role: file_signature(Path(getattr(config, role))) for role in signatures} != signatures:
                raise LmtrainError("the corpus changed while it was being tokenized; run again")
        record = {"format": FORMAT, "key": key, "tokenizer": tokenizer.to_dict(), "dtype": str(dtype).split(".")[1],
                  "splits": splits, "files": {role: getattr(config, role) for role in signatures}}
        atomic_write(folder / f"{key}.json", json.dumps(record).encode())
    except OSError as error:
        raise CacheUnwritable(f"cannot write the token cache {folder}: {os_reason(error)}") from None
    seconds = time.perf_counter() - begin
    megabytes = sum(signature[0] for signature in signatures.values()) / 1e6
    tokens = sum(length - 1 for _, length, _ in splits)  # the text's: each stream's leading <eos> is not
    echo(f"tokenized {megabytes:,.1f} MB into {tokens:,} tokens in {seconds:.1f} s "
         f"({megabytes / max(seconds, 1e-9):,.1f} MB/s), cached in {folder}")


def _write_split(file: BinaryIO, name: str, pieces: Iterator[str], tokenizer: Tokenizer, dtype: torch.dtype) -> list:
    """Pass 2 for one split: its ids appended to `file`; [name, length, unknown tokens] (the unknown
    tokens of valid and test are warned about; those of train are not counted: null)."""
    length = unknown = 0
    for ids, missing in encode_pieces(tokenizer, pieces, count_unknown=name != "train"):
        file.write(_as_bytes(ids, dtype))
        length, unknown = length + ids.numel(), unknown + missing
    return [name, length, unknown if name != "train" else None]


def _as_bytes(ids: Tensor, dtype: torch.dtype) -> bytearray:
    """`ids` in `dtype`, as raw bytes for the file (no NumPy: a tensor over a bytearray)."""
    data = bytearray(ids.numel() * torch.empty(0, dtype=dtype).element_size())
    if data:
        torch.frombuffer(data, dtype=dtype).copy_(ids)
    return data


def _reason(error: Exception) -> str:
    if isinstance(error, OSError):
        return os_reason(error)
    if isinstance(error, json.JSONDecodeError):
        return "not JSON"
    if isinstance(error, (KeyError, TypeError, IndexError)):
        return f"a missing or malformed field {error}"
    return str(error)
