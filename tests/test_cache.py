"""lmtrain.data.cache: the token cache gives the streams the in-memory path gives, is reused, is rebuilt
when damaged or out of date, and steps aside (one warning) when it cannot be written."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmtrain.config import DataConfig
from lmtrain.data import cache, encoding
from lmtrain.data.cache import Corpus, cached_corpus, corpus_in_memory, load_corpus, smallest_dtype
from lmtrain.data.encoding import stream_ids
from lmtrain.data.tokenizer import Tokenizer

TEXTS = {
    "plain": "the cat sat\nthe dog ran\na cat ran\n\nthe end\n" * 6,
    "no final newline, non-ASCII": "naïve café über\nstraße 日本語 テキスト\n\nlast line é" * 5,
    "undecodable bytes": b"ok \xfe fine\nhalf \xe2\x82 cut\n" * 8,
}


def write(path: Path, content: str | bytes) -> str:
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)


@pytest.fixture
def folder(tmp_path: Path, monkeypatch) -> Path:
    """A cache of its own, read in 5-byte blocks so that every test corpus spans many of them."""
    monkeypatch.setenv("LMTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(encoding, "BLOCK_BYTES", 5)
    return tmp_path / "cache" / "tokens"


def expected_corpus(config: DataConfig, tokenizer: Tokenizer | None = None) -> tuple[Tokenizer, dict, dict]:
    """What today's in-memory path gives: the tokenizer, each split's ids, the unknown counts."""
    corpus = corpus_in_memory(config, tokenizer=tokenizer)
    streams = {split: stream_ids(corpus.tokenizer, text).tolist() for split, text in corpus.splits.items()}
    return corpus.tokenizer, streams, corpus.unknown


def assert_same_as_in_memory(config: DataConfig, tokenizer: Tokenizer | None = None, **options) -> None:
    corpus = cached_corpus(config, tokenizer=tokenizer, **options)
    want_tokenizer, want_streams, want_unknown = expected_corpus(config, tokenizer)
    assert corpus.tokenizer == want_tokenizer
    assert {split: ids.tolist() for split, ids in corpus.splits.items()} == want_streams
    assert corpus.unknown == want_unknown


# --- the same streams as today ---------------------------------------------------------------------

@pytest.mark.parametrize("name", list(TEXTS))
@pytest.mark.parametrize("level", ["char", "word"])
@pytest.mark.parametrize("split", [[0.8, 0.2], [0.6, 0.2, 0.2]])
def test_cached_streams_equal_the_in_memory_ones(folder: Path, tmp_path: Path, name: str, level: str, split: list):
    config = DataConfig(path=write(tmp_path / "corpus.txt", TEXTS[name]), split=split, level=level,
                        encoding_errors="replace")
    assert_same_as_in_memory(config)
    assert_same_as_in_memory(config)  # and again, from the entry


@pytest.mark.parametrize("level", ["char", "word"])
@pytest.mark.parametrize("eos", ["line", "none"])
def test_cached_streams_of_three_files(folder: Path, tmp_path: Path, level: str, eos: str):
    config = DataConfig(train=write(tmp_path / "t.txt", "a b c\nb c d\n" * 4),
                        valid=write(tmp_path / "v.txt", "a e\nz\n"),
                        test=write(tmp_path / "x.txt", "\ufeffc d\r\nunseen é"), level=level, eos=eos, min_freq=2)
    assert_same_as_in_memory(config)
    assert cached_corpus(config).unknown["valid"][0] > 0  # e and z were never seen in training


def test_one_long_line_is_cut_inside_it(folder: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(encoding, "BLOCK_BYTES", 4096)
    config = DataConfig(path=write(tmp_path / "corpus.txt", "abcd efg " * 4000), split=[0.9, 0.1])  # 36,000 chars
    assert_same_as_in_memory(config)


@pytest.mark.parametrize("size, dtype", [(3, torch.uint8), (256, torch.uint8), (257, torch.uint16),
                                         (65536, torch.uint16), (65537, torch.uint32)])
def test_smallest_dtype(size: int, dtype: torch.dtype):
    assert smallest_dtype(size) == dtype


@pytest.mark.parametrize("words, dtype", [(300, torch.uint16), (70_000, torch.uint32)])
def test_large_vocabularies_are_stored_wider(folder: Path, tmp_path: Path, monkeypatch, words: int, dtype: torch.dtype):
    monkeypatch.setattr(encoding, "BLOCK_BYTES", 1 << 16)
    lines = [" ".join(f"w{index}" for index in range(start, min(start + 10, words))) for start in range(0, words, 10)]
    config = DataConfig(path=write(tmp_path / "corpus.txt", "\n".join(lines) * 2), level="word", split=[0.5, 0.5])
    corpus = cached_corpus(config)
    assert corpus.splits["train"].dtype == dtype
    assert corpus.splits["valid"].tolist() == stream_ids(corpus.tokenizer,
                                                         corpus_in_memory(config).splits["valid"]).tolist()


# --- reuse, and what makes an entry out of date ----------------------------------------------------

def test_second_load_neither_hashes_nor_tokenizes(folder: Path, tmp_path: Path, monkeypatch):
    config = DataConfig(path=write(tmp_path / "corpus.txt", TEXTS["plain"]), level="word")
    lines: list[str] = []
    first = cached_corpus(config, echo=lines.append)
    assert len(lines) == 1 and lines[0].startswith("tokenized ")

    def forbidden(*args, **kwargs):
        raise AssertionError("the second load must come from the cache")
    for name in ("hash_file", "split_texts", "fit_tokenizer", "encode_pieces", "write_entry"):
        monkeypatch.setattr(cache, name, forbidden)
    second = cached_corpus(config, echo=lines.append)
    assert len(lines) == 1
    assert second.tokenizer == first.tokenizer and torch.equal(second.splits["train"], first.splits["train"])


def test_the_tokenized_count_is_the_texts_tokens(folder: Path, tmp_path: Path):
    """Each split's stream starts with an <eos> of its own (the first target's context), not the text's."""
    text = "ab\ncd\n" * 50  # 300 characters, the line ends <eos>
    lines: list[str] = []
    cached_corpus(DataConfig(path=write(tmp_path / "corpus.txt", text), level="char"), echo=lines.append)
    assert lines[0].startswith("tokenized 0.0 MB into 300 tokens in "), lines


def test_changed_content_makes_a_new_entry(folder: Path, tmp_path: Path):
    path = tmp_path / "corpus.txt"
    config = DataConfig(path=write(path, "a b\nc d\n" * 5), level="word")
    cached_corpus(config)
    write(path, "x y\nz w\n" * 5)  # the same size, other words
    assert_same_as_in_memory(config)
    assert len(list(folder.glob("*.json"))) == 2


def test_settings_are_part_of_the_key(folder: Path, tmp_path: Path):
    path = write(tmp_path / "corpus.txt", TEXTS["plain"])
    for options in ({}, {"level": "word"}, {"min_freq": 2}, {"split": [0.5, 0.5]}, {"eos": "none"}):
        assert_same_as_in_memory(DataConfig(path=path, **options))
    assert len(list(folder.glob("*.json"))) == 5


# --- damaged, interrupted, unwritable --------------------------------------------------------------

def damage_truncate(folder: Path) -> None:
    ids = next(folder.glob("*.ids"))
    ids.write_bytes(ids.read_bytes()[:-3])


def damage_record(folder: Path) -> None:
    next(folder.glob("*.json")).write_text("{not json", encoding="utf-8")


def damage_field(folder: Path) -> None:
    record = next(folder.glob("*.json"))
    record.write_text(record.read_text(encoding="utf-8").replace('"dtype": "uint8"', '"dtype": "uint16"'),
                      encoding="utf-8")


def damage_remove_ids(folder: Path) -> None:
    next(folder.glob("*.ids")).unlink()


def damage_ids_past_the_vocabulary(folder: Path) -> None:
    """Same size, other bytes: ids the vocabulary does not have."""
    ids = next(folder.glob("*.ids"))
    data = bytearray(ids.read_bytes())
    data[5:9] = b"\xfa\xfa\xfa\xfa"
    ids.write_bytes(bytes(data))


def damage_forged_vocabulary(folder: Path) -> None:
    """The record's vocabulary cut to its first tokens, the ids file left as it is."""
    import json

    record_path = next(folder.glob("*.json"))
    record = json.loads(record_path.read_text(encoding="utf-8"))
    record["tokenizer"]["tokens"] = record["tokenizer"]["tokens"][:4]
    record_path.write_text(json.dumps(record), encoding="utf-8")


@pytest.mark.parametrize("damage", [damage_truncate, damage_record, damage_field, damage_remove_ids,
                                    damage_ids_past_the_vocabulary, damage_forged_vocabulary])
def test_a_damaged_entry_is_rebuilt_with_a_warning(folder: Path, tmp_path: Path, damage):
    config = DataConfig(path=write(tmp_path / "corpus.txt", TEXTS["plain"]))
    cached_corpus(config)
    damage(folder)
    warnings: list[str] = []
    assert_same_as_in_memory(config, warn=warnings.append)
    assert len(warnings) == 1 and warnings[0].startswith("warning: the token cache entry") and "damaged" in warnings[0]
    warnings.clear()
    assert_same_as_in_memory(config, warn=warnings.append)  # rebuilt: whole again
    assert warnings == []


def test_an_interrupted_tokenization_leaves_no_entry(folder: Path, tmp_path: Path, monkeypatch):
    config = DataConfig(path=write(tmp_path / "corpus.txt", TEXTS["plain"]))
    real = cache.encode_pieces

    def interrupted(*args, **kwargs):
        for number, block in enumerate(real(*args, **kwargs)):
            if number == 3:
                raise KeyboardInterrupt
            yield block
    monkeypatch.setattr(cache, "encode_pieces", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cached_corpus(config)
    assert list(folder.glob("*.json")) == [] and list(folder.glob(".*tmp")) == []
    monkeypatch.setattr(cache, "encode_pieces", real)
    assert_same_as_in_memory(config)


def test_a_killed_tokenizations_leftover_goes_at_the_next_one(folder: Path, tmp_path: Path):
    """SIGKILL mid-tokenization leaves `.KEY.ids.XXXXXXXX.tmp` (no handler runs): the next tokenization
    of that key removes it once no process holds its lock; a live writer's file, held, stays."""
    config = DataConfig(path=write(tmp_path / "corpus.txt", TEXTS["plain"]))
    cached_corpus(config)
    (ids,) = folder.glob("*.ids")
    killed, live = folder / f".{ids.name}.k1ll3d00.tmp", folder / f".{ids.name}.l1ve0000.tmp"
    for leftover in (killed, live):
        leftover.write_bytes(b"\0" * 64)
        os.utime(leftover, (0, 0))  # older than a writer could still be starting
    ids.unlink()  # the entry is tokenized again
    with live.open("rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        assert_same_as_in_memory(config)
    assert not killed.exists() and live.exists()


def test_an_unwritable_cache_falls_back_to_memory(tmp_path: Path, monkeypatch):
    (tmp_path / "a file").write_text("", encoding="utf-8")
    monkeypatch.setenv("LMTRAIN_CACHE", str(tmp_path / "a file" / "cache"))  # cannot be created, even by root
    config = DataConfig(path=write(tmp_path / "corpus.txt", TEXTS["plain"]))
    warnings: list[str] = []
    corpus = load_corpus(config, warn=warnings.append)
    assert corpus.splits == corpus_in_memory(config).splits  # the texts, read whole
    assert len(warnings) == 1 and "cannot write the token cache" in warnings[0] and "into memory" in warnings[0]


def test_a_full_disk_falls_back_to_memory(folder: Path, tmp_path: Path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(cache, "_as_bytes", full)
    config = DataConfig(path=write(tmp_path / "corpus.txt", TEXTS["plain"]))
    warnings: list[str] = []
    corpus = load_corpus(config, warn=warnings.append)
    assert isinstance(corpus.splits["train"], str)
    assert len(warnings) == 1 and "the disk is full" in warnings[0]
    assert [path.name for path in folder.iterdir()] == ["files"]  # no entry, no temporary file


def test_a_read_only_cache_still_serves_its_entries(folder: Path, tmp_path: Path, monkeypatch):
    config = DataConfig(path=write(tmp_path / "corpus.txt", TEXTS["plain"]))
    cached_corpus(config)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(cache, "atomic_write", read_only)
    monkeypatch.setattr(cache, "write_entry", read_only)
    warnings: list[str] = []
    assert not isinstance(load_corpus(config, warn=warnings.append).splits["train"], str)
    assert warnings == []


# --- the corpus a run trains on ---------------------------------------------------------------------

def test_corpus_view_reads_text_and_ids_alike(small_text: str):
    tokenizer = Tokenizer.fit(small_text, level="word")
    as_text = Corpus(tokenizer, {"train": small_text}, {})
    as_ids = Corpus(tokenizer, {"train": stream_ids(tokenizer, small_text).to(torch.uint8)}, {})
    for right_to_left in (False, True):
        text_view, ids_view = (as_text.view("train", right_to_left=right_to_left),
                               as_ids.view("train", right_to_left=right_to_left))
        assert stream_ids(tokenizer, text_view).tolist() == ids_view.tolist()


def test_corpus_in_memory_counts_unknown_valid_tokens(tmp_path: Path):
    config = DataConfig(train=write(tmp_path / "t.txt", "a b\n"), valid=write(tmp_path / "v.txt", "a c d\n"),
                        level="word")
    corpus = corpus_in_memory(config)
    assert corpus.splits == {"train": "a b\n", "valid": "a c d\n"}
    assert corpus.unknown == {"valid": (2, 4)}
    given = Tokenizer.fit("a c d\n", level="word")
    assert corpus_in_memory(config, tokenizer=given).tokenizer is given


# --- when the cache is not used, and resume ---------------------------------------------------------

@pytest.mark.parametrize("options", [{"cache": False}, {"mode": "sentences"}])
def test_the_cache_is_skipped_when_off_or_in_sentences_mode(folder: Path, tmp_path: Path, options: dict):
    config = DataConfig(path=write(tmp_path / "corpus.txt", TEXTS["plain"]), **options)
    assert isinstance(load_corpus(config).splits["train"], str)
    assert not folder.exists()


def test_a_checkpoint_tokenizer_wins(folder: Path, tmp_path: Path):
    config = DataConfig(path=write(tmp_path / "corpus.txt", TEXTS["plain"]), level="word")
    fitted = cached_corpus(config).tokenizer
    assert cached_corpus(config, tokenizer=fitted).tokenizer == fitted  # the same vocabulary: the same entry
    assert len(list(folder.glob("*.json"))) == 1
    other = Tokenizer(level="word", eos="line", tokens=["<unk>", "<eos>", "cat", "the"])
    assert_same_as_in_memory(config, tokenizer=other)
    assert len(list(folder.glob("*.json"))) == 2


# --- the command line ---------------------------------------------------------------------------------

def test_train_twice_the_second_run_reads_the_cache(tmp_path: Path):
    write(tmp_path / "corpus.txt", "".join(f"line {index % 7} of the corpus\n" for index in range(400)))
    write(tmp_path / "tiny.yaml", "data:\n  path: corpus.txt\nmodel:\n  embed_size: 8\n  hidden_size: 16\n"
                                  "  num_layers: 1\ntrain:\n  max_steps: 2\n  batch_size: 4\n  bptt: 8\n"
                                  "  eval_every: 2\n  final_samples: 0\n")
    environment = {**os.environ, "LMTRAIN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}

    def train(out_dir: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "lmtrain", "train", "tiny.yaml", f"train.out_dir={out_dir}",
                               "--no-progress", *extra], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                              env=environment)

    first = train("first")
    assert first.returncode == 0, first.stderr
    entries = sorted((tmp_path / "cache" / "tokens").glob("*.json"))
    assert len(entries) == 1 and "tokenized " in first.stdout
    stamp = entries[0].stat().st_mtime_ns
    second = train("second")
    assert second.returncode == 0, second.stderr
    assert "tokenized " not in second.stdout and entries[0].stat().st_mtime_ns == stamp
    loss = [line for line in first.stdout.splitlines() if line.startswith("step 2:")]
    assert loss and loss == [line for line in second.stdout.splitlines() if line.startswith("step 2:")]
    resumed = train("second", "train.max_steps=3", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "tokenized " not in resumed.stdout and "resuming" in resumed.stdout


def test_a_mapped_ids_file_that_shrinks_is_reported(folder: Path, tmp_path: Path):
    """Reading past the new end of a truncated mapping would kill the process with SIGBUS: it is
    checked first, and named."""
    from lmtrain.errors import LmtrainError

    corpus = cached_corpus(DataConfig(path=write(tmp_path / "corpus.txt", TEXTS["plain"])))
    corpus.check_mapped()  # whole: nothing said
    corpus.mapped.release()  # as where no lease can be had: the size is what is left to check
    ids = next(folder.glob("*.ids"))
    size = ids.stat().st_size
    os.truncate(ids, 0)
    with pytest.raises(LmtrainError, match=rf"token cache file .* changed while it was in use: it shrank from {size:,} "
                                           rf"to 0 bytes"):
        corpus.check_mapped()


def test_a_process_truncating_the_mapped_file_waits_until_the_reader_lets_go(folder: Path, tmp_path: Path):
    """With a read lease (Linux), another process's truncate blocks until `check_mapped` sees the lease
    being broken and lets go: no read of the mapping can be under way when the file shrinks."""
    import subprocess
    import sys
    import time

    from lmtrain.errors import LmtrainError

    corpus = cached_corpus(DataConfig(path=write(tmp_path / "corpus.txt", TEXTS["plain"])))
    if corpus.mapped.lease is None:
        pytest.skip("no file leases here (another OS, or a file system without them)")
    ids = next(folder.glob("*.ids"))
    truncate = subprocess.Popen([sys.executable, "-c", f"import os; os.truncate({str(ids)!r}, 0)"])
    time.sleep(1.0)
    assert truncate.poll() is None and ids.stat().st_size > 0  # waiting for this process
    with pytest.raises(LmtrainError, match="another process is writing or truncating it"):
        corpus.check_mapped()
    assert truncate.wait(timeout=30) == 0 and ids.stat().st_size == 0  # let go: it went on
