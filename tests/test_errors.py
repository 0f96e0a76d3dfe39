"""Bad input, through the real CLI: one `error:` line on stderr and a non-zero exit, never a traceback.
Inputs that are odd but fine (a byte-order mark, CRLF line ends, one 50 MB line, words or characters
unseen in training) train, sample or evaluate, with at most a `warning:` line.

Every case is data in CASES: the files its folder holds, the command, and what must come out. The
same list makes the table in docs/errors.md (`python scripts/error_table.py`), so the documented
messages are the ones a user gets. Each case runs `python -m lmtrain ...` in a folder of its own
under tmp_path, four processes at a time; the two checkpoints some cases need are trained once,
in-process, while the others run. Each child's peak memory is read by a small launcher process (see
LAUNCHER), its own and no other's, so the 50 MB line is measured alongside the rest.

The 50 MB case is `test_50mb_single_line_trains_in_bounded_memory` (about 10 s of one core); it is
part of the default run and CI. Leave it out locally with `pytest -k "not 50mb"`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Union

import pytest
import yaml

# Real processes, builds or whole training runs: `pytest -m "not slow"` leaves this file out.
pytestmark = pytest.mark.slow

LMTRAIN = [sys.executable, "-m", "lmtrain"]
# One thread per process: several run side by side on a small machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NO_COLOR": "1", "COLUMNS": "120",
       "PYTHONIOENCODING": "utf-8"}
WORKERS = 4
TIMEOUT_S = 300
RSS_BOUND_MB = 1536  # 1.5 GB for the 50 MB line

WORDS = "the a cat dog sat ran on under mat rug big small red blue old new saw ate fish bird".split()


# -- what a case is ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Shared:
    """A file or folder of the shared trained runs (see SHARED_RUNS), copied into the case's folder;
    with `first_bytes`, only that many bytes of the file (a truncated copy)."""
    path: str
    first_bytes: int | None = None


FileSpec = Union[str, bytes, Shared, Callable[[Path], None], None]  # None: an empty folder; a callable writes the file


@dataclasses.dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    max_rss_kb: int | None  # the child's own peak resident set size (Linux: KiB)
    seconds: float          # wall clock
    cpu_seconds: float | None = None  # the child's own user + system time

    def dump(self) -> str:
        return f"exit {self.returncode}\nstdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-3000:]}"


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    what: str                                  # the input, in words (the table's first column)
    args: tuple[str, ...]                      # after `lmtrain`, run in the case's folder
    files: dict[str, FileSpec] = dataclasses.field(default_factory=dict)
    outcome: str = "error"                     # error | ok | debug
    exit_code: int = 2
    expect: tuple[str, ...] = ()               # in the error line (error, debug) or a warning line (ok)
    forbid: tuple[str, ...] = ()               # must not be in the error / warning line
    check: Callable[[Path, Result], None] | None = None  # more assertions on the folder afterwards
    max_rss_mb: int | None = None
    heavy: bool = False                        # the 50 MB line: its own test
    note: str = ""                             # what `check` verifies, for the table
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # environment variables of the command

    @property
    def needs_shared(self) -> bool:
        return any(isinstance(spec, Shared) or getattr(spec, "reads_shared", False) for spec in self.files.values())


# -- inputs ---------------------------------------------------------------------------------------------

def sentences(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) for _ in range(count)]


CORPUS = "".join(line + "\n" for line in sentences(60, seed=1))


def config_text(**values) -> str:
    """A tiny config (char level, stream, one 8-unit LSTM layer, 2 steps) as YAML; dotted `values`
    (with `__` for the dot) override it."""
    tree = {
        "data": {"path": "corpus.txt", "level": "char"},
        "model": {"embed_size": 8, "hidden_size": 8, "num_layers": 1},
        "train": {"batch_size": 2, "bptt": 8, "max_steps": 2, "eval_every": 1000, "eval_segment": 64,
                  "log_every": 1000, "checkpoint_every": 1000, "final_samples": 0, "device": "cpu",
                  "out_dir": "run"},
    }
    for key, value in values.items():
        section, _, name = key.partition("__")
        if value is None:
            tree[section].pop(name, None)
        else:
            tree[section][name] = value
    return yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)


TINY = config_text()
# Nine anchors, each a list of nine aliases of the one before: 9^9 values once written out, in 470 bytes.
ALIAS_BOMB = ("data:\n  path: corpus.txt\n  split: &a0 [" + ", ".join(['"lol"'] * 9) + "]\n"
              + "".join(f"  k{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n" for i in range(1, 9)))
TRAIN = ("train", "--no-progress")


def tiny_with(**files: FileSpec) -> dict[str, FileSpec]:
    return {"tiny.yaml": TINY, "corpus.txt": CORPUS, **files}


def fifty_megabytes(target: Path) -> None:
    """~50 MB of random lowercase letters and spaces and no newline, written in well under a second."""
    alphabet = b"abcdefghijklmnopqrstuvwxyz "
    table = bytes(alphabet[i % len(alphabet)] for i in range(256))
    target.write_bytes(random.Random(0).randbytes(50_000_000).translate(table))


def zip_of_something_else(target: Path) -> None:
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr("notes/readme.txt", "a zip file, but no checkpoint\n")


def foreign_torch_file(target: Path) -> None:
    import torch

    torch.save({"weights": torch.zeros(3)}, target)


PAYLOAD_MARKER = "payload-ran"


class _Payload:
    """Unpickling this creates the folder `marker`: the kind of side effect a hostile checkpoint has.
    Through `os.mkdir` (a module torch's safe loader blocks outright) or `exec` (a builtin it does not
    allow): the two ways the safe loader words its refusal."""

    def __init__(self, marker: str, via: str) -> None:
        self.marker, self.via = marker, via

    def __reduce__(self):
        if self.via == "os":
            return os.mkdir, (self.marker,)
        return exec, (f"import os; os.mkdir({self.marker!r})",)


def write_pickle_payload(target: Path, marker: Path, via: str) -> None:
    import torch

    torch.save({"format_version": 1, "config": {}, "tokenizer": {}, "model": _Payload(str(marker), via)}, target)


def pickle_payload_os(target: Path) -> None:
    write_pickle_payload(target, target.parent / PAYLOAD_MARKER, "os")


def pickle_payload_exec(target: Path) -> None:
    write_pickle_payload(target, target.parent / PAYLOAD_MARKER, "exec")


# -- checks beyond the message --------------------------------------------------------------------------

def checkpoint_tokens(path: Path) -> list[str]:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["tokenizer"]["tokens"]


def no_bom_or_cr_tokens(folder: Path, result: Result) -> None:
    tokens = checkpoint_tokens(folder / "run" / "best.pt")
    assert "\ufeff" not in tokens and "\r" not in tokens, tokens
    assert {"t", "h", "e", " "} <= set(tokens), tokens


def existing_run_unchanged(folder: Path, result: Result) -> None:
    for name in ("last.pt", "best.pt", "metrics.jsonl"):
        before = (folder.parent / "_shared" / "char" / "run" / name).read_bytes()
        assert (folder / "run" / name).read_bytes() == before, f"{name} changed"


def lock_linked_to_notes(target: Path) -> None:
    """A run folder whose lock is a symbolic link to notes.txt beside it."""
    target.mkdir()
    (target / "lock").symlink_to("../notes.txt")


def notes_unchanged(folder: Path, result: Result) -> None:
    assert (folder / "notes.txt").read_text() == "keep me\n", "notes.txt changed"


def reads_shared(make: Callable[[Path], None]) -> Callable[[Path], None]:
    """Marks a file-writing callable that starts from the shared trained runs: its case waits for them."""
    make.reads_shared = True
    return make


def edited_checkpoint(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """The shared char run's best.pt, its contents changed by `edit`."""
    def make(target: Path) -> None:
        import torch

        payload = torch.load(target.parent.parent / "_shared" / "char" / "run" / "best.pt", weights_only=True)
        edit(payload)
        torch.save(payload, target)
    return reads_shared(make)


def forged_checkpoint(**replaced) -> Callable[[Path], None]:
    """The shared char run's best.pt with some of its entries replaced."""
    return edited_checkpoint(lambda payload: payload.update(replaced))


def all_weights_nan(payload: dict) -> None:
    import torch

    payload["model"] = {name: torch.full_like(tensor, float("nan")) for name, tensor in payload["model"].items()}


def weights_as_integers(payload: dict) -> None:
    payload["model"] = {name: tensor.long() for name, tensor in payload["model"].items()}


def projection_one_row_short(payload: dict) -> None:
    payload["model"]["projection.weight"] = payload["model"]["projection.weight"][:-1].clone()


def output_weights_overflowing(payload: dict) -> None:
    """Output weights at 3e38: finite, but their logits are not."""
    payload["model"]["projection.weight"].fill_(3e38)


nan_checkpoint = edited_checkpoint(all_weights_nan)
FORGED_TOKENIZER = {"level": "char", "eos": "line", "tokens": ["<unk>", "<eos>", 1, 2, 3]}


@reads_shared
def bit_rot_checkpoint(target: Path) -> None:
    """The shared char run's best.pt with the last byte of its largest tensor flipped: the zip archive still
    reads, torch.load reads other weights, and only the part's CRC-32 tells."""
    import struct

    source = target.parent.parent / "_shared" / "char" / "run" / "best.pt"
    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        tensors = [info for info in archive.infolist() if "/data/" in info.filename]
    part = max(tensors, key=lambda info: info.compress_size)
    name_length, extra_length = struct.unpack("<HH", data[part.header_offset + 26:part.header_offset + 30])
    data[part.header_offset + 30 + name_length + extra_length + part.compress_size - 1] ^= 0xFF
    target.write_bytes(bytes(data))


def symlink_loop(target: Path) -> None:
    """`target` and its sibling `other-<name>`, two links naming each other."""
    (target.parent / f"other-{target.name}").symlink_to(target.name)
    target.symlink_to(f"other-{target.name}")


def run_trained_on(corpus_text: str) -> Callable[[Path], None]:
    """A run folder whose checkpoints say it trained on this case's corpus.txt while that file held
    `corpus_text` (the shared char run's checkpoints, their records pointed here)."""
    def make(target: Path) -> None:
        import hashlib

        import torch

        shutil.copytree(target.parent.parent / "_shared" / "char" / "run", target)
        corpus = target.parent / "corpus.txt"
        for checkpoint in target.glob("*.pt"):
            payload = torch.load(checkpoint, weights_only=True)
            payload["config"]["data"]["path"] = str(corpus)
            payload["config"]["train"]["out_dir"] = str(target)
            payload["data_files"] = {"path": {"path": str(corpus), "size": len(corpus_text.encode()),
                                              "sha256": hashlib.sha256(corpus_text.encode()).hexdigest()}}
            torch.save(payload, checkpoint)
    return reads_shared(make)


def run_with_last_edited(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """`run_trained_on` this case's corpus, its last.pt's contents changed by `edit` (best.pt intact)."""
    def make(target: Path) -> None:
        import torch

        run_trained_on(CORPUS)(target)
        payload = torch.load(target / "last.pt", weights_only=True)
        edit(payload)
        torch.save(payload, target / "last.pt")
    return reads_shared(make)


def run_with_damaged_last(**replaced) -> Callable[[Path], None]:
    """`run_with_last_edited`: some entries of its last.pt replaced."""
    return run_with_last_edited(lambda payload: payload.update(replaced))


def short_rng_state(payload: dict) -> None:
    import torch

    payload["rng"] = {"torch": torch.zeros(5, dtype=torch.uint8), "cuda": []}


def misshapen_adam_state(payload: dict) -> None:
    import torch

    payload["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)


def payload_did_not_run(folder: Path, result: Result) -> None:
    assert not (folder / PAYLOAD_MARKER).exists(), "the checkpoint's pickle payload ran"


def prime_starts_every_sample(folder: Path, result: Result) -> None:
    lines = result.stdout[:-1].split("\n")
    assert len(lines) == 2 and all(line.startswith("the ☃é") for line in lines), result.stdout


def fifty_unseen_tokens(folder: Path, result: Result) -> None:
    assert json.loads(result.stdout)["tokens"] == 50, result.stdout  # 10 lines of 4 words and an <eos>


def trained(folder: Path, result: Result) -> None:
    assert "done:" in result.stdout and (folder / "run" / "last.pt").is_file(), result.stdout


def not_trained(folder: Path, result: Result) -> None:
    assert not (folder / "run" / "last.pt").exists(), "a checkpoint was written"


def big_line_trained(folder: Path, result: Result) -> None:
    trained(folder, result)
    assert "done: 3 steps" in result.stdout, result.stdout


# -- the cases ------------------------------------------------------------------------------------------

CHAR_PT = Shared("char/run/best.pt")
WORD_PT = Shared("word/run/best.pt")
SAMPLE = ("sample", "--checkpoint", "model.pt")
EVAL = ("eval", "perplexity", "--checkpoint", "model.pt")
VISUALIZE = ("visualize", "--checkpoint", "model.pt", "--text", "text.txt")


def no_page(folder: Path, result: Result) -> None:
    assert not (folder / "visualize.html").exists(), "a page was written"


def config_kept(folder: Path, result: Result) -> None:
    assert (folder / "run" / "config.yaml").read_text(encoding="utf-8") == config_text(data__path="../corpus.txt")


def checkpoint_kept(folder: Path, result: Result) -> None:
    assert (folder / "model.pt").read_bytes()[:2] == b"PK", "the checkpoint was written over"  # a torch.save zip


def text_kept(folder: Path, result: Result) -> None:
    assert (folder / "text.html").read_text(encoding="utf-8") == "to be or not\n", "the text was written over"


def no_image(folder: Path, result: Result) -> None:
    assert not [path.name for path in folder.glob("curves*")], "an image was written"


EVENTS = "".join(f'{{"step": {step}, "split": "train", "loss": 2.0, "elapsed_s": {step}}}\n' for step in (1, 2))

CASES: list[Case] = [
    # config file
    Case("config-missing", "config file that does not exist", (*TRAIN, "nowhere.yaml"),
         expect=("config file not found", "nowhere.yaml")),
    Case("config-directory", "config path is a directory", (*TRAIN, "configs"), {"configs": None},
         expect=("configs", "directory")),
    Case("config-empty", "empty config file (no corpus named)", (*TRAIN, "empty.yaml"), {"empty.yaml": ""},
         expect=("data.path",)),
    Case("config-invalid-yaml", "invalid YAML", (*TRAIN, "bad.yaml"),
         {"bad.yaml": "model:\n  hidden_size: [16\ntrain:\n  max_steps: 3\n"},
         expect=("bad.yaml", "invalid YAML", "line")),
    Case("config-not-a-mapping", "YAML whose top level is a list", (*TRAIN, "list.yaml"),
         {"list.yaml": "- data\n- model\n"}, expect=("list.yaml", "mapping")),
    Case("config-not-utf8", "config file that is not UTF-8", (*TRAIN, "latin1.yaml"),
         {"latin1.yaml": "# café\ntrain:\n  max_steps: 3\n".encode("latin-1")},
         expect=("latin1.yaml", "byte offset 5")),
    Case("config-control-character", "config file with a control character (an ANSI colour code)",
         (*TRAIN, "pasted.yaml"), {"pasted.yaml": "\x1b[0m" + TINY, "corpus.txt": CORPUS},
         expect=("pasted.yaml", "invalid YAML")),
    Case("config-nul-in-path", "config whose data.path holds a NUL character", (*TRAIN, "nul.yaml"),
         {"nul.yaml": TINY.replace("path: corpus.txt", 'path: "corpus\\0.txt"')}, expect=("data.path",)),
    Case("config-in-out-dir", "a new run whose config is its own `train.out_dir`'s config.yaml, written by hand",
         (*TRAIN, "run/config.yaml"),
         {"corpus.txt": CORPUS, "run/config.yaml": config_text(data__path="../corpus.txt")},
         expect=("run/config.yaml is the config.yaml a run writes", "train.out_dir"), check=config_kept,
         note="the config is unchanged"),
    Case("config-is-a-device", "`lmtrain train /dev/zero` (a config that never ends)", (*TRAIN, "/dev/zero"), {},
         expect=("/dev/zero", "device", "not a YAML file")),
    Case("config-threads-too-many", "`train.threads=100000`", (*TRAIN, "tiny.yaml", "train.threads=100000"),
         tiny_with(), expect=("train.threads", "1 to 1024", "100000")),
    Case("config-duplicate-section", "a YAML file with the section `model:` twice", (*TRAIN, "twice.yaml"),
         tiny_with(**{"twice.yaml": TINY + "model:\n  cell: gru\n"}),
         expect=("twice.yaml", "'model' appears twice", "lines")),
    Case("config-duplicate-key", "a key given twice in one section", (*TRAIN, "twice.yaml"),
         tiny_with(**{"twice.yaml": TINY.replace("hidden_size: 8", "hidden_size: 8\n  hidden_size: 16")}),
         expect=("'hidden_size' appears twice",)),
    Case("config-alias-bomb", "a 470-byte YAML alias bomb (nine anchors, each nine times the last)",
         (*TRAIN, "bomb.yaml"), tiny_with(**{"bomb.yaml": ALIAS_BOMB}),
         expect=("bomb.yaml", "aliases expand", "100,000"), max_rss_mb=600),
    Case("config-nested-100000-deep", "a YAML value nested 100,000 levels deep", (*TRAIN, "deep.yaml"),
         tiny_with(**{"deep.yaml": "data: " + "[" * 100_000 + "]" * 100_000 + "\n"}),
         expect=("deep.yaml", "nested too deeply")),
    Case("config-infinite-lr", "`train.lr=.inf` (NaN is refused alike)", (*TRAIN, "tiny.yaml", "train.lr=.inf"),
         tiny_with(), expect=("train.lr", "finite number", "inf")),
    Case("config-model-too-large-hidden", "`model.hidden_size=1000000000`",
         (*TRAIN, "tiny.yaml", "model.hidden_size=1000000000"), tiny_with(),
         expect=("would have", "parameters", "model.hidden_size=1000000000", "memory")),
    Case("config-model-too-large-embedding", "`model.embed_size=1000000000000000000`",
         (*TRAIN, "tiny.yaml", "model.embed_size=1000000000000000000"), tiny_with(),
         expect=("would have", "model.embed_size=1000000000000000000")),
    Case("config-model-too-many-layers", "`model.num_layers=1000000`",
         (*TRAIN, "tiny.yaml", "model.num_layers=1000000", "model.hidden_size=64"), tiny_with(),
         expect=("would have", "model.num_layers=1000000")),
    Case("config-misspelled-override", "misspelled key on the command line",
         (*TRAIN, "tiny.yaml", "model.hiden_size=16"),
         tiny_with(), expect=("model.hiden_size", "did you mean", "model.hidden_size")),
    Case("config-misspelled-in-file", "misspelled key in the YAML file", (*TRAIN, "typo.yaml"),
         {"typo.yaml": config_text(train__max_step=3), "corpus.txt": CORPUS},
         expect=("train.max_step", "did you mean", "train.max_steps")),
    Case("config-unknown-section", "unknown section in the YAML file", (*TRAIN, "section.yaml"),
         {"section.yaml": TINY + "modle:\n  cell: gru\n", "corpus.txt": CORPUS},
         expect=("modle", "did you mean", "model")),
    Case("config-override-not-key-value", "override without `=`", (*TRAIN, "tiny.yaml", "hidden_size"), tiny_with(),
         expect=("hidden_size", "KEY=VALUE")),
    Case("config-wrong-type-override", "wrong type on the command line", (*TRAIN, "tiny.yaml", "model.hidden_size=abc"),
         tiny_with(), expect=("model.hidden_size", "integer", "abc")),
    Case("config-wrong-type-in-file", "wrong type in the YAML file", (*TRAIN, "types.yaml"),
         {"types.yaml": config_text(train__lr="fast"), "corpus.txt": CORPUS}, expect=("train.lr", "number", "fast")),
    Case("config-zero-size", "zero size", (*TRAIN, "tiny.yaml", "model.hidden_size=0"), tiny_with(),
         expect=("model.hidden_size", "positive", "0")),
    Case("config-negative-size", "negative size", (*TRAIN, "tiny.yaml", "train.batch_size=-1"), tiny_with(),
         expect=("train.batch_size", "positive", "-1")),
    Case("config-precision-needs-manual-backward", "bfloat16 products with the autograd layers",
         (*TRAIN, "tiny.yaml", "train.precision=bfloat16", "model.gradients=autograd"), tiny_with(),
         expect=("train.precision", "bfloat16", "model.gradients: manual")),
    # corpus
    Case("corpus-missing", "corpus file that does not exist", (*TRAIN, "tiny.yaml", "data.path=nowhere.txt"),
         tiny_with(), expect=("corpus file not found", "nowhere.txt")),
    Case("corpus-directory", "corpus path is a directory", (*TRAIN, "tiny.yaml", "data.path=texts"),
         tiny_with(texts=None), expect=("texts", "directory")),
    Case("corpus-empty", "empty corpus file", (*TRAIN, "tiny.yaml", "data.path=empty.txt"),
         tiny_with(**{"empty.txt": b""}), expect=("empty.txt", "empty")),
    Case("corpus-only-newlines", "corpus of only newlines", (*TRAIN, "tiny.yaml", "data.path=newlines.txt"),
         tiny_with(**{"newlines.txt": b"\n\n\n\n\n"}), expect=("newlines.txt",)),
    Case("corpus-binary", "binary file as corpus (a PNG header)", (*TRAIN, "tiny.yaml", "data.path=image.png"),
         tiny_with(**{"image.png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))}),
         expect=("image.png", "byte offset 0", "utf-8")),
    Case("min-lr-above-lr", "`train.min_lr` above `train.lr` with a cosine schedule",
         (*TRAIN, "tiny.yaml", "train.schedule=cosine", "train.min_lr=1"), tiny_with(),
         expect=("train.min_lr (1) is above train.lr", "cosine")),
    Case("corpus-utf16-without-bom", "`data.encoding=utf-16` on a file without a byte-order mark",
         (*TRAIN, "tiny.yaml", "data.encoding=utf-16"), tiny_with(), expect=("cannot be read as utf-16", "BOM")),
    Case("encoding-not-for-text", "`data.encoding=idna`, a codec that is not for files of text",
         (*TRAIN, "tiny.yaml", "data.encoding=idna"), tiny_with(), expect=("'idna'", "not an encoding of text files")),
    Case("corpus-not-utf8", "Latin-1 corpus (not UTF-8)", (*TRAIN, "tiny.yaml", "data.path=latin1.txt"),
         tiny_with(**{"latin1.txt": "the cat sat\nthé chat\n".encode("latin-1")}),
         expect=("latin1.txt", "byte offset 14", "data.encoding_errors")),
    Case("corpus-bom", "byte-order mark (config and corpus)", (*TRAIN, "tiny.yaml"),
         {"tiny.yaml": "\ufeff" + TINY, "corpus.txt": "\ufeff" + CORPUS}, outcome="ok", exit_code=0,
         check=no_bom_or_cr_tokens, note="no U+FEFF token in best.pt's vocabulary"),
    Case("corpus-crlf", "CRLF line ends (config and corpus)", (*TRAIN, "tiny.yaml"),
         {"tiny.yaml": TINY.replace("\n", "\r\n").encode(), "corpus.txt": CORPUS.replace("\n", "\r\n").encode()},
         outcome="ok", exit_code=0, check=no_bom_or_cr_tokens, note="no \\r token in best.pt's vocabulary"),
    Case("corpus-name-not-utf8", "a corpus whose file name is no UTF-8 (`caf\\xe9.txt`, Latin-1)",
         (*TRAIN, "tiny.yaml", "data.path=caf\udce9.txt"), tiny_with(**{"caf\udce9.txt": CORPUS}), outcome="ok",
         exit_code=0, check=trained, note="trained"),
    Case("corpus-device", "`data.path=/dev/zero` (a device that never ends)",
         (*TRAIN, "tiny.yaml", "data.path=/dev/zero"), tiny_with(),
         expect=("/dev/zero", "character device", "not a regular file")),
    Case("corpus-symlink-loop", "`data.path` that is a loop of symbolic links",
         (*TRAIN, "tiny.yaml", "data.path=loop.txt"), tiny_with(**{"loop.txt": symlink_loop}),
         expect=("loop.txt", "symbolic link loop")),
    Case("resume-corpus-changed", "`--resume` after the corpus was edited in place (same size)",
         (*TRAIN, "--resume", "tiny.yaml", "train.max_steps=4"),
         tiny_with(**{"corpus.txt": CORPUS.replace("the", "THE"), "run": run_trained_on(CORPUS)}),
         expect=("--resume", "corpus changed", "corpus.txt", "same size", "--allow-changed-data")),
    Case("resume-corpus-changed-allowed", "`--resume --allow-changed-data` after the corpus was cut short",
         (*TRAIN, "--resume", "--allow-changed-data", "tiny.yaml", "train.max_steps=4"),
         tiny_with(**{"corpus.txt": CORPUS[:len(CORPUS) // 2], "run": run_trained_on(CORPUS)}),
         outcome="ok", exit_code=0, expect=("corpus changed", "continuing", "--allow-changed-data")),
    Case("corpus-lone-cr", "lone CR line ends (classic Mac text)", (*TRAIN, "tiny.yaml"),
         tiny_with(**{"corpus.txt": CORPUS.replace("\n", "\r").encode()}),
         outcome="ok", exit_code=0, check=no_bom_or_cr_tokens, note="no \\r token in best.pt's vocabulary"),
    Case("corpus-no-line-ends", "training and validation files without a line end (data.eos: line)",
         (*TRAIN, "tiny.yaml", "data.path=null", "data.train=train.txt", "data.valid=valid.txt"),
         tiny_with(**{"train.txt": CORPUS.replace("\n", " ") * 3, "valid.txt": CORPUS.replace("\n", " ")}),
         outcome="ok", exit_code=0, expect=("no line ends", "data.eos: none")),
    Case("corpus-50mb-line", "one 50 MB line, no newline (char level, stream)", (*TRAIN, "big.yaml"),
         {"big.yaml": config_text(data__path="big.txt", data__split=[0.99, 0.01], model__hidden_size=16,
                                  train__batch_size=4, train__bptt=16, train__max_steps=3,
                                  train__eval_every=1_000_000, train__eval_segment=256),
          "big.txt": fifty_megabytes},
         outcome="ok", exit_code=0, check=big_line_trained, max_rss_mb=RSS_BOUND_MB, heavy=True,
         expect=("no line ends", "data.eos: none"),
         note="3 steps trained"),
    Case("corpus-one-short-line", "a short corpus of one line cut by data.split",
         (*TRAIN, "tiny.yaml", "data.path=line.txt"), tiny_with(**{"line.txt": "the cat sat on the mat"}),
         expect=("validation", "data.valid"), forbid=("larger data.split",)),
    Case("corpus-too-short-for-batch", "corpus too short for train.batch_size streams",
         (*TRAIN, "tiny.yaml", "train.batch_size=32"), tiny_with(**{"corpus.txt": "the cat sat\n" * 4}),
         expect=("train.batch_size", "32")),
    Case("corpus-shorter-than-batch-x-bptt", "corpus shorter than batch_size x bptt (but 2+ tokens a stream)",
         (*TRAIN, "tiny.yaml", "train.batch_size=8", "train.bptt=64"), tiny_with(**{"corpus.txt": CORPUS[:300]}),
         outcome="ok", exit_code=0, check=trained),
    Case("config-seed-past-int64", "`train.seed=99999999999999999999`",
         (*TRAIN, "tiny.yaml", "train.seed=99999999999999999999"), tiny_with(),
         expect=("train.seed", "64-bit integer")),
    Case("config-key-a-list", "a YAML key that is a list (`? [a, b]`)", (*TRAIN, "key.yaml"),
         tiny_with(**{"key.yaml": TINY + "? [a, b]\n: 1\n"}), expect=("key.yaml", "a key must be a name")),
    Case("config-final-samples-too-many", "`train.final_samples=100000000` (drawn side by side at the end)",
         (*TRAIN, "tiny.yaml", "train.final_samples=100000000"), tiny_with(),
         expect=("train.final_samples", "side by side", "GB"), check=not_trained,
         note="refused before any step"),
    Case("compiled-switch-unknown", "`LMTRAIN_COMPILED=yes` (neither 0 nor 1)", (*TRAIN, "tiny.yaml"), tiny_with(),
         env={"LMTRAIN_COMPILED": "yes"}, expect=("LMTRAIN_COMPILED", "0", "1", "'yes'")),
    Case("version-compiled-switch-unknown", "`LMTRAIN_COMPILED=yes lmtrain --version`", ("--version",), {},
         env={"LMTRAIN_COMPILED": "yes"}, expect=("LMTRAIN_COMPILED", "'yes'")),
    Case("config-threads-zero", "`train.threads=0`", (*TRAIN, "tiny.yaml", "train.threads=0"), tiny_with(),
         expect=("train.threads", "auto or a number of threads from 1 to 1024", "0")),
    Case("kernels-build-without-compiler", "`lmtrain kernels build` where there is no C++ compiler",
         ("kernels", "build"), {}, env={"CXX": "no-such-compiler"},
         expect=("could not be built", "no C++ compiler (no-such-compiler)")),
    Case("kernels-wait-not-a-number", "`LMTRAIN_KERNELS_WAIT=soon` (the wait for another process's build)",
         (*TRAIN, "tiny.yaml"), tiny_with(), env={"LMTRAIN_KERNELS_WAIT": "soon"},
         expect=("LMTRAIN_KERNELS_WAIT", "number of seconds", "soon")),
    Case("compiled-kernels-required-unavailable",
         "`LMTRAIN_COMPILED=1` where the compiled kernels cannot be built (no C++ compiler)",
         (*TRAIN, "tiny.yaml"), tiny_with(), env={"LMTRAIN_COMPILED": "1", "CXX": "no-such-compiler"},
         expect=("LMTRAIN_COMPILED=1", "compiled kernels", "no C++ compiler")),
    Case("compiled-kernels-required-unavailable-eval",
         "`LMTRAIN_COMPILED=1 lmtrain eval perplexity` where the compiled kernels cannot be built",
         ("eval", "perplexity", "--checkpoint", "model.pt"), {"model.pt": CHAR_PT},
         env={"LMTRAIN_COMPILED": "1", "CXX": "no-such-compiler"},
         expect=("LMTRAIN_COMPILED=1", "compiled kernels", "no C++ compiler")),
    Case("compiled-kernels-required-unavailable-sample",
         "`LMTRAIN_COMPILED=1 lmtrain sample` where the compiled kernels cannot be built",
         ("sample", "--checkpoint", "model.pt", "--num", "2", "--max-tokens", "5"), {"model.pt": CHAR_PT},
         env={"LMTRAIN_COMPILED": "1", "CXX": "no-such-compiler"},
         expect=("LMTRAIN_COMPILED=1", "compiled kernels", "no C++ compiler")),
    # the run folder
    Case("out-dir-under-a-file", "train.out_dir that cannot be created (under a regular file)",
         (*TRAIN, "tiny.yaml", "train.out_dir=notes.txt/run"), tiny_with(**{"notes.txt": "a regular file\n"}),
         expect=("cannot create", "train.out_dir", "notes.txt/run")),
    Case("out-dir-holds-a-run", "train.out_dir that already holds a run", (*TRAIN, "tiny.yaml"),
         tiny_with(run=Shared("char/run")), expect=("already holds a run", "--resume"), check=existing_run_unchanged,
         note="last.pt, best.pt and metrics.jsonl unchanged, byte for byte"),
    Case("out-dir-lock-is-a-link", "train.out_dir whose `lock` is a symbolic link to another file",
         (*TRAIN, "tiny.yaml"), tiny_with(**{"notes.txt": "keep me\n", "run": lock_linked_to_notes}),
         expect=("run/lock is a symbolic link", "remove it"), check=notes_unchanged,
         note="the file the link names unchanged"),
    Case("resume-without-run", "--resume with no run in train.out_dir", (*TRAIN, "--resume", "tiny.yaml"),
         tiny_with(), expect=("nothing to resume", "last.pt", "a relative train.out_dir is read from the current "
                                                               "folder")),
    # checkpoints
    Case("checkpoint-missing", "checkpoint that does not exist", ("sample", "--checkpoint", "nowhere.pt"),
         expect=("checkpoint not found", "nowhere.pt")),
    Case("checkpoint-directory", "checkpoint path is a directory", ("eval", "perplexity", "--checkpoint", "run"),
         {"run": None}, expect=("directory", "best.pt")),
    Case("checkpoint-text-file", "text file as checkpoint", (*SAMPLE[:2], "notes.txt"),
         {"notes.txt": "not a checkpoint\n"}, expect=("notes.txt", "not a readable lmtrain checkpoint"),
         forbid=("Python objects",)),
    Case("checkpoint-zip-of-something-else", "a .pt that is a zip of something else", SAMPLE,
         {"model.pt": zip_of_something_else}, expect=("model.pt", "checkpoint"), forbid=("Python objects",)),
    Case("checkpoint-truncated", "truncated checkpoint (first 1000 bytes)", SAMPLE,
         {"model.pt": Shared("char/run/best.pt", first_bytes=1000)},
         expect=("model.pt", "not a readable lmtrain checkpoint"), forbid=("Python objects",)),
    Case("checkpoint-foreign-torch-file", "torch file that is not an lmtrain checkpoint", SAMPLE,
         {"model.pt": foreign_torch_file}, expect=("model.pt", "not an lmtrain checkpoint")),
    Case("checkpoint-pickle-payload", "checkpoint with a pickle payload: `exec(...)` creating a folder", SAMPLE,
         {"model.pt": pickle_payload_exec}, expect=("model.pt", "refused", "exec"), forbid=("truncated",),
         check=payload_did_not_run, note="the payload did not run"),
    Case("checkpoint-pickle-payload-os", "checkpoint with a pickle payload: `os.mkdir(...)`", SAMPLE,
         {"model.pt": pickle_payload_os}, expect=("model.pt", "refused", "mkdir"), forbid=("truncated",),
         check=payload_did_not_run, note="the payload did not run"),
    # sample options
    Case("sample-top-p", "`--top-p 1.5`", (*SAMPLE, "--top-p", "1.5"), {"model.pt": CHAR_PT},
         expect=("--top-p", "1.5")),
    Case("sample-temperature", "`--temperature -1`", (*SAMPLE, "--temperature", "-1"), {"model.pt": CHAR_PT},
         expect=("--temperature", "-1")),
    Case("sample-top-k", "`--top-k 0`", (*SAMPLE, "--top-k", "0"), {"model.pt": CHAR_PT}, expect=("--top-k", "0")),
    Case("sample-max-tokens", "`--max-tokens 0`", (*SAMPLE, "--max-tokens", "0"), {"model.pt": CHAR_PT},
         expect=("--max-tokens",)),
    Case("sample-num-not-a-number", "`--num many` (not a number)", (*SAMPLE, "--num", "many"),
         {"model.pt": CHAR_PT}, expect=("--num", "valid int", "lmtrain sample --help")),  # 0.27: "not a valid int"
    Case("sample-checkpoint-no-value", "`--checkpoint` with no value after it", ("sample", "--checkpoint"), {},
         expect=("Option '--checkpoint' requires an argument", "(see: lmtrain sample --help)")),
    Case("unknown-option", "an option the command does not have", (*TRAIN, "--no-such-flag", "tiny.yaml"),
         tiny_with(), expect=("No such option", "--no-such-flag")),
    Case("sample-temperature-tiny", "`--temperature 1e-45` (as good as greedy)",
         (*SAMPLE, "--temperature", "1e-45", "--max-tokens", "5"), {"model.pt": CHAR_PT}, outcome="ok", exit_code=0),
    Case("sample-seed-too-large", "`--seed 100000000000000000000000`",
         (*SAMPLE, "--seed", "100000000000000000000000"), {"model.pt": CHAR_PT}, expect=("--seed", "64-bit")),
    Case("sample-num-too-many", "`--num 1000000000000`", (*SAMPLE, "--num", "1000000000000"), {"model.pt": CHAR_PT},
         expect=("--num", "side by side", "GB")),
    Case("sample-nan-weights", "a checkpoint whose weights are NaN", SAMPLE, {"model.pt": nan_checkpoint},
         expect=("not finite", "weights")),
    Case("sample-bit-rot", "a checkpoint with one flipped byte inside a weight tensor (bit rot)", SAMPLE,
         {"model.pt": bit_rot_checkpoint}, expect=("model.pt", "damaged", "fails its checksum")),
    Case("eval-nan-weights", "`eval perplexity` of a checkpoint whose weights are NaN", EVAL,
         {"model.pt": nan_checkpoint}, expect=("damaged", "not finite", "weights")),
    Case("eval-segment-past-int64", "`--segment 99999999999999999999`", (*EVAL, "--segment", "99999999999999999999"),
         {"model.pt": CHAR_PT}, expect=("--segment", "64-bit integer")),
    Case("resume-damaged-rng", "`--resume` when last.pt's RNG state is a string (forged or damaged)",
         (*TRAIN, "--resume", "tiny.yaml", "train.max_steps=4"),
         tiny_with(run=run_with_damaged_last(rng="a string")), outcome="ok", exit_code=0,
         expect=("last.pt", "damaged", "rng", "older checkpoint"), check=trained,
         note="resumed from best.pt and trained"),
    Case("resume-damaged-rng-size", "`--resume` when last.pt's RNG state has the wrong size",
         (*TRAIN, "--resume", "tiny.yaml", "train.max_steps=4"),
         tiny_with(run=run_with_last_edited(short_rng_state)), outcome="ok", exit_code=0,
         expect=("last.pt", "damaged", "rng", "older checkpoint"), check=trained,
         note="resumed from best.pt and trained"),
    Case("resume-misshapen-optimizer-state", "`--resume` when last.pt's Adam state is shaped unlike its parameter",
         (*TRAIN, "--resume", "tiny.yaml", "train.max_steps=4"),
         tiny_with(run=run_with_last_edited(misshapen_adam_state)),
         expect=("optimizer state does not fit the model", "exp_avg", "(3,)", "damaged")),
    Case("eval-outputs-not-finite", "`eval perplexity --json` of finite weights whose outputs overflow (3e38)",
         (*EVAL, "--json"), {"model.pt": edited_checkpoint(output_weights_overflowing)},
         expect=("not finite", "diverged")),
    Case("diagnose-count-past-memory", "`diagnose gradients --count 9223372036854775807`",
         ("diagnose", "gradients", "--checkpoint", "model.pt", "--count", "9223372036854775807"),
         {"model.pt": CHAR_PT}, expect=("out of memory",)),
    Case("checkpoint-weights-integers", "a forged checkpoint whose weights are integers", SAMPLE,
         {"model.pt": edited_checkpoint(weights_as_integers)}, expect=("model.pt", "damaged", "int64",
                                                                        "not floating-point")),
    Case("checkpoint-weight-wrong-shape", "a forged checkpoint whose output weights lack a row", SAMPLE,
         {"model.pt": edited_checkpoint(projection_one_row_short)},
         expect=("model.pt", "does not match", "size mismatch for projection.weight")),
    Case("checkpoint-tokenizer-forged", "a forged checkpoint whose vocabulary holds numbers, not strings", SAMPLE,
         {"model.pt": forged_checkpoint(tokenizer=FORGED_TOKENIZER)},
         expect=("model.pt", "damaged", "tokenizer", "strings")),
    Case("resume-damaged-tokenizer", "`--resume` when last.pt's vocabulary holds numbers",
         (*TRAIN, "--resume", "tiny.yaml", "train.max_steps=4"),
         tiny_with(run=run_with_damaged_last(tokenizer=FORGED_TOKENIZER)), outcome="ok", exit_code=0,
         expect=("last.pt", "damaged", "tokenizer", "older checkpoint"), check=trained,
         note="resumed from best.pt and trained"),
    Case("plot-no-events", "`lmtrain plot` of a run whose metrics.jsonl is empty", ("plot", "run"),
         {"run/metrics.jsonl": ""}, expect=("no train or valid events", "run/metrics.jsonl")),
    Case("plot-run-name-not-utf8", "`lmtrain plot` of a run folder whose name is no UTF-8 (`r\\xe9`)",
         ("plot", "r\udce9", "-o", "curves.png"), {"r\udce9/metrics.jsonl": EVENTS}, outcome="ok", exit_code=0,
         check=lambda folder, result: (folder / "curves.png").stat(), note="the image is written"),
    Case("plot-output-not-an-image", "`lmtrain plot -o` naming no .png, .svg or .pdf file",
         ("plot", "run", "-o", "curves"), {"run/metrics.jsonl": EVENTS},
         expect=("-o must name a .png or .svg or .pdf file", "curves"), check=no_image,
         note="no image written"),
    Case("diagnose-overrides-with-checkpoint", "`diagnose gradients --checkpoint` with KEY=VALUE overrides",
         ("diagnose", "gradients", "--checkpoint", "model.pt", "model.hidden_size=4"), {"model.pt": CHAR_PT},
         expect=("overrides go with --config", "model.hidden_size=4")),
    Case("agreement-group-by-tsv", "`eval agreement --group-by` with pairs in a TSV",
         ("eval", "agreement", "--checkpoint", "model.pt", "--data", "pairs.tsv", "--group-by", "UID"),
         {"model.pt": CHAR_PT, "pairs.tsv": "the cat is .\tthe cat are .\n"}, expect=("pairs.tsv", "--group-by")),
    Case("resume-damaged-data-files", "`--resume` when last.pt's record of the corpus files is a string",
         (*TRAIN, "--resume", "tiny.yaml", "train.max_steps=4"),
         tiny_with(run=run_with_damaged_last(data_files="a string")), outcome="ok", exit_code=0,
         expect=("last.pt", "damaged", "data_files", "older checkpoint"), check=trained,
         note="resumed from best.pt and trained"),
    Case("checkpoint-config-a-string", "a forged checkpoint whose config is a string", ("info", "model.pt"),
         {"model.pt": forged_checkpoint(config="a string")}, expect=("not an lmtrain checkpoint", "config", "str")),
    Case("checkpoint-progress-a-string", "a forged checkpoint whose progress is a string", ("info", "model.pt"),
         {"model.pt": forged_checkpoint(progress="a string")}, expect=("not an lmtrain checkpoint", "progress")),
    Case("checkpoint-progress-step-a-string", "a forged checkpoint whose progress.step is the string 'x'",
         ("info", "model.pt"), {"model.pt": forged_checkpoint(progress={"step": "x", "epoch": 0})},
         expect=("progress.step is 'x'",)),
    Case("checkpoint-version-a-string", "a forged checkpoint whose format version is the string '1'", SAMPLE,
         {"model.pt": forged_checkpoint(format_version="1")}, expect=("format version '1' is not a number",)),
    Case("checkpoint-symlink-loop", "a checkpoint path that is a loop of symbolic links",
         ("sample", "--checkpoint", "loop.pt"), {"loop.pt": symlink_loop},
         expect=("loop.pt", "loop of symbolic links")),
    Case("eval-data-device", "`eval perplexity --data /dev/zero`", (*EVAL, "--data", "/dev/zero"),
         {"model.pt": CHAR_PT}, expect=("/dev/zero", "character device")),
    Case("sample-num", "`--num 0`", (*SAMPLE, "--num", "0"), {"model.pt": CHAR_PT}, expect=("--num",)),
    Case("sample-device-cuda", "`--device cuda` on a machine without CUDA", (*SAMPLE, "--device", "cuda"),
         {"model.pt": CHAR_PT}, expect=("--device", "cuda", "CUDA"), forbid=("train.device", "auto")),
    Case("sample-device-unknown", "`--device` that names no device", (*SAMPLE, "--device", "gpu0"),
         {"model.pt": CHAR_PT}, expect=("--device", "gpu0")),
    Case("sample-prime-unseen-chars", "characters unseen in training in `--prime`",
         (*SAMPLE, "--prime", "the ☃é", "--num", "2", "--max-tokens", "5", "--seed", "0"), {"model.pt": CHAR_PT},
         outcome="ok", exit_code=0, expect=("2 token(s) of --prime", "<unk>"), check=prime_starts_every_sample),
    # visualize
    Case("visualize-text-missing", "`visualize --text` naming no file", (*VISUALIZE[:-1], "nowhere.txt"),
         {"model.pt": CHAR_PT}, expect=("nowhere.txt",), check=no_page),
    Case("visualize-text-empty", "`visualize --text` on an empty file", VISUALIZE,
         {"model.pt": CHAR_PT, "text.txt": b""}, expect=("text.txt", "no tokens"), check=no_page),
    Case("visualize-unit", "`visualize --unit` past the layer's units", (*VISUALIZE, "--unit", "100000"),
         {"model.pt": CHAR_PT, "text.txt": "to be or not\n"}, expect=("--unit must be 0 to",), check=no_page),
    Case("visualize-quantity", "`visualize --quantity` the cell does not have", (*VISUALIZE, "--quantity", "z"),
         {"model.pt": CHAR_PT, "text.txt": "to be or not\n"}, expect=("--quantity must be one of",),
         check=no_page),
    Case("visualize-feature-count", "`visualize --feature` with fewer labels than positions",
         (*VISUALIZE, "--feature", "mine=labels.txt"),
         {"model.pt": CHAR_PT, "text.txt": "to be or not\n", "labels.txt": "1\n0\n"},
         expect=("labels.txt has 2 labels", "positions"), check=no_page),
    Case("visualize-output-folder", "`visualize -o` into a folder that does not exist",
         (*VISUALIZE, "-o", "nowhere/page.html"), {"model.pt": CHAR_PT, "text.txt": "to be or not\n"},
         expect=("cannot write", "nowhere/page.html")),
    Case("visualize-output-text", "`visualize -o` naming the text it reads (text.html)",
         ("visualize", "--checkpoint", "model.pt", "--text", "text.html", "-o", "text.html"),
         {"model.pt": CHAR_PT, "text.html": "to be or not\n"}, expect=("-o text.html is the input text.html",),
         check=text_kept, note="the text is unchanged"),
    Case("visualize-output-checkpoint", "`visualize -o` naming the checkpoint it reads",
         (*VISUALIZE, "-o", "model.pt"), {"model.pt": CHAR_PT, "text.txt": "to be or not\n"},
         expect=("-o must name a .html or .htm file", "model.pt"), check=checkpoint_kept),
    Case("visualize-output-link-to-checkpoint", "`visualize -o page.html`, page.html a link to the checkpoint",
         (*VISUALIZE, "-o", "page.html"),
         {"model.pt": CHAR_PT, "text.txt": "to be or not\n", "page.html": lambda target: target.symlink_to("model.pt")},
         expect=("-o page.html is a link to", "model.pt", "not a .html file"), check=checkpoint_kept,
         note="the checkpoint is unchanged"),
    Case("checkpoint-device", "`sample --checkpoint /dev/zero` (a device that never ends)",
         ("sample", "--checkpoint", "/dev/zero"), {}, expect=("/dev/zero is a character device", "not a checkpoint")),
    # eval
    Case("eval-empty-data", "`eval perplexity --data` on an empty file",
         ("eval", "perplexity", "--checkpoint", "model.pt", "--data", "empty.txt"),
         {"model.pt": CHAR_PT, "empty.txt": b""}, expect=("empty.txt", "no tokens")),
    Case("eval-data-not-utf8", "`eval perplexity --data` on a Latin-1 file, the model reading UTF-8",
         (*EVAL, "--data", "latin1.txt"),
         {"model.pt": CHAR_PT, "latin1.txt": "the cat sat\nthé chat\n".encode("latin-1")},
         expect=("latin1.txt", "byte offset 14 is not valid utf-8", "iconv -t utf-8"),
         forbid=("data.encoding_errors",)),
    Case("eval-data-empty-name", "`eval perplexity --data \"\"` (no file name)", (*EVAL, "--data", ""),
         {"model.pt": CHAR_PT}, expect=("--data needs a file name",)),
    Case("visualize-text-empty-name", "`visualize --text \"\"` (no file name)", (*VISUALIZE[:-1], ""),
         {"model.pt": CHAR_PT}, expect=("--text needs a file name",)),
    Case("eval-data-and-split", "`eval perplexity` given both `--data` and `--split`",
         (*EVAL, "--data", "text.txt", "--split", "test"), {"model.pt": CHAR_PT, "text.txt": "to be or not\n"},
         expect=("give --data FILE or --split, not both",)),
    Case("eval-negative-segment", "`eval perplexity --segment` below 0",
         ("eval", "perplexity", "--checkpoint", "model.pt", "--segment", "-1"),
         {"model.pt": CHAR_PT}, expect=("--segment", ">= 0", "-1")),
    Case("eval-unseen-words", "word-level eval file of words unseen in training",
         ("eval", "perplexity", "--checkpoint", "model.pt", "--data", "unseen.txt", "--json"),
         {"model.pt": WORD_PT, "unseen.txt": "zebra quokka yak gnu\n" * 10}, outcome="ok", exit_code=0,
         expect=("40 of 50", "80.00%", "unseen.txt", "<unk>"), check=fifty_unseen_tokens,
         note="all 50 tokens scored"),
    Case("eval-unseen-chars", "character-level eval file with characters unseen in training",
         ("eval", "perplexity", "--checkpoint", "model.pt", "--data", "unseen.txt"),
         {"model.pt": CHAR_PT, "unseen.txt": "zqx é ☃\n"}, outcome="ok", exit_code=0,
         expect=("5 of 8", "62.50%", "<unk>")),
    # diagnose
    Case("diagnose-nothing-to-measure", "`diagnose gradients` with neither --checkpoint nor --config",
         ("diagnose", "gradients"), expect=("--checkpoint", "--config")),
    # --debug
    Case("debug-traceback", "a user error with `--debug`", ("--debug", *TRAIN, "tiny.yaml", "model.hidden_size=0"),
         tiny_with(), outcome="debug", expect=("model.hidden_size",)),
]
CASE_BY_NAME = {case.name: case for case in CASES}
assert len(CASE_BY_NAME) == len(CASES), "case names must be unique"

# The two trained runs the cases copy checkpoints (or a whole run folder) from.
SHARED_RUNS = {
    "char": {"tiny.yaml": TINY, "corpus.txt": CORPUS},
    "word": {"tiny.yaml": config_text(data__path=None, data__train="train.txt", data__valid="valid.txt",
                                      data__level="word", data__mode="sentences"),
             "train.txt": "".join(line + "\n" for line in sentences(80, seed=2)),
             "valid.txt": "".join(line + "\n" for line in sentences(10, seed=3))},
}


# -- running a case -------------------------------------------------------------------------------------

def write_files(folder: Path, files: dict[str, FileSpec], shared: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, spec in files.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if spec is None:
            target.mkdir()
        elif isinstance(spec, str):
            target.write_text(spec, encoding="utf-8", newline="")
        elif isinstance(spec, bytes):
            target.write_bytes(spec)
        elif isinstance(spec, Shared):
            source = shared / spec.path
            if source.is_dir():
                shutil.copytree(source, target)
            elif spec.first_bytes is not None:
                target.write_bytes(source.read_bytes()[:spec.first_bytes])
            else:
                shutil.copyfile(source, target)
        else:
            spec(target)


def prepare_shared(root: Path) -> Path:
    """Train the shared runs (2 steps each) once, in this process: no second torch import."""
    from lmtrain.config import load_config
    from lmtrain.training.trainer import train

    shared = root / "_shared"
    for name, files in SHARED_RUNS.items():
        folder = shared / name
        write_files(folder, files, shared)
        config = load_config(folder / "tiny.yaml", [f"train.out_dir={folder / 'run'}"])
        train(config, progress_bar=False)
    return shared


# A small launcher between the test and `lmtrain`: the peak RSS a parent reads for its child includes
# the parent's own at the fork (Linux carries the old address space's high-water mark across exec),
# so read from this ~10 MB process it is lmtrain's own, not the test process's (torch loaded: 400 MB).
LAUNCHER = """
import json, resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as handle:
    json.dump({"max_rss_kb": usage.ru_maxrss, "cpu_seconds": usage.ru_utime + usage.ru_stime}, handle)
sys.exit(code if code >= 0 else 128 - code)
"""


def run_lmtrain(args: Iterable[str], cwd: Path, timeout: float = TIMEOUT_S,
                env: dict[str, str] | None = None) -> Result:
    """Run `python -m lmtrain ARGS` in `cwd` (with `env` added to the environment): its exit code,
    output, own peak RSS and CPU time."""
    with tempfile.TemporaryDirectory() as scratch:
        usage_file = Path(scratch) / "usage.json"
        begin = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(usage_file), *LMTRAIN, *map(str, args)],
                                   cwd=cwd, env={**ENV, **(env or {})}, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(process.pid)  # the whole session: the launcher and lmtrain
            stdout, stderr = process.communicate()
        seconds = time.perf_counter() - begin
        usage = json.loads(usage_file.read_text()) if usage_file.exists() else {}
        return Result(process.returncode, stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace"),
                      usage.get("max_rss_kb"), seconds, usage.get("cpu_seconds"))


def _kill(process_group: int) -> None:
    try:
        os.killpg(process_group, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_case(case: Case, root: Path) -> Result:
    """Create the case's folder `root/<name>` with its files and run its command there (the shared
    runs, if the case needs them, are in `root/_shared`: see `prepare_shared`)."""
    folder = root / case.name
    write_files(folder, case.files, root / "_shared")
    return run_lmtrain(case.args, folder, env=case.env)


def run_cases(cases: Iterable[Case], root: Path, workers: int = WORKERS) -> dict[str, Future]:
    """Start every case, `workers` at a time, the heavy ones first; those that need a trained
    checkpoint once `prepare_shared` (run here, meanwhile) has made them. {name: Future[Result]}."""
    ordered = sorted(cases, key=lambda case: not case.heavy)
    pool = ThreadPoolExecutor(max_workers=workers)
    futures = {case.name: pool.submit(run_case, case, root) for case in ordered if not case.needs_shared}
    try:
        prepare_shared(root)
    except Exception as error:  # noqa: BLE001 - the cases that need no checkpoint still report
        failure = RuntimeError(f"training the shared checkpoints failed: {type(error).__name__}: {error}")
        for case in ordered:
            if case.needs_shared:
                futures[case.name] = Future()
                futures[case.name].set_exception(failure)
    else:
        futures.update({case.name: pool.submit(run_case, case, root) for case in ordered if case.needs_shared})
    pool.shutdown(wait=False)
    return futures


def error_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def check_case(case: Case, result: Result, folder: Path) -> None:
    """Assert that `result` is what `case` promises: AssertionError whose first line says what is
    wrong, followed by the whole output."""
    everything = result.dump()

    def require(condition: bool, reason: str) -> None:
        if not condition:
            raise AssertionError(f"{reason}\n{everything}")

    assert case.outcome in ("error", "ok", "debug"), case.outcome
    lines = result.stderr.strip().splitlines()
    require(result.returncode == case.exit_code, f"exit code {result.returncode}, expected {case.exit_code}")
    if case.outcome == "debug":
        require(result.returncode != 0, "exit code 0 with --debug on a mistake")
        require("Traceback" in result.stderr, "no traceback with --debug")
        line = error_line(result)
        require(line.startswith("error:"), "the last stderr line is not the `error:` line")
    else:
        require("Traceback" not in result.stdout + result.stderr, "a traceback")
    if case.outcome == "error":
        require(len(lines) == 1, f"{len(lines)} lines on stderr, expected one")
        line = lines[0] if lines else ""
        require(line.startswith("error:"), "the stderr line does not start with `error:`")
        require("internal error" not in line, "an internal error (a crash), not a message about the input")
    elif case.outcome == "ok":
        require(all(line.startswith("warning:") for line in lines), "stderr holds more than `warning:` lines")
        if not case.expect:
            require(not lines, "a warning where none was expected")
            line = ""
        else:
            matching = [line for line in lines if all(fragment in line for fragment in case.expect)]
            require(len(matching) == 1, f"no single warning line with all of {case.expect}")
            line = matching[0]
    for fragment in case.expect:
        require(fragment in line, f"{fragment!r} is not in the message")
    for fragment in case.forbid:
        require(fragment not in line, f"{fragment!r} should not be in the message")
    if case.max_rss_mb is not None and result.max_rss_kb is not None:
        require(result.max_rss_kb / 1024 < case.max_rss_mb,
                f"peak RSS {result.max_rss_kb / 1024:.0f} MB, over {case.max_rss_mb} MB")
    if case.check is not None:
        case.check(folder, result)


# -- the tests ------------------------------------------------------------------------------------------

HEAVY_TEST = "test_50mb_single_line_trains_in_bounded_memory"


@pytest.fixture(scope="module")
def started(tmp_path_factory, request) -> tuple[Path, dict[str, Future]]:
    """Every case started at once (the 50 MB one only when its test is selected)."""
    root = tmp_path_factory.mktemp("errors")
    heavy_selected = any(getattr(item, "originalname", item.name) == HEAVY_TEST for item in request.session.items)
    cases = [case for case in CASES if heavy_selected or not case.heavy]
    return root, run_cases(cases, root)


def verify(started, name: str) -> None:
    root, futures = started
    case = CASE_BY_NAME[name]
    check_case(case, futures[name].result(), root / name)


@pytest.mark.parametrize("name", [case.name for case in CASES if not case.heavy])
def test_case(started, name):
    verify(started, name)


def test_50mb_single_line_trains_in_bounded_memory(started):
    """~10 s: read, split, vocabulary and ids of a 50 MB line, three steps, peak RSS under 1.5 GB."""
    (heavy,) = [case.name for case in CASES if case.heavy]
    verify(started, heavy)


@pytest.mark.parametrize("via", ["os", "exec"])
def test_pickle_payload_is_live(tmp_path, via):
    """The payloads of the checkpoint-pickle-payload cases do run when unpickled unsafely: the cases'
    check that they did not run means something."""
    import torch

    marker = tmp_path / "ran"
    write_pickle_payload(tmp_path / "model.pt", marker, via)
    torch.load(tmp_path / "model.pt", weights_only=False)
    assert marker.is_dir()


def test_every_requirement_has_a_case():
    """The issue's list, each at least one case (so the table in docs/errors.md covers it)."""
    required = ["config-missing", "config-directory", "corpus-missing", "corpus-directory", "corpus-empty",
                "corpus-only-newlines", "corpus-binary", "corpus-not-utf8", "corpus-bom", "corpus-crlf",
                "corpus-50mb-line", "corpus-too-short-for-batch", "config-misspelled-override",
                "config-misspelled-in-file", "config-wrong-type-override", "config-invalid-yaml", "config-zero-size",
                "config-negative-size", "sample-top-p", "sample-temperature", "checkpoint-text-file",
                "eval-unseen-words", "sample-prime-unseen-chars", "eval-unseen-chars", "out-dir-under-a-file",
                "out-dir-holds-a-run", "resume-without-run", "checkpoint-zip-of-something-else",
                "checkpoint-truncated", "checkpoint-pickle-payload", "checkpoint-pickle-payload-os",
                "eval-empty-data", "sample-top-k", "sample-max-tokens", "sample-num", "sample-device-cuda",
                "sample-device-unknown",
                "diagnose-nothing-to-measure", "debug-traceback"]
    assert not [name for name in required if name not in CASE_BY_NAME]


def command_line(case: Case) -> str:
    """The command as a user would type it."""
    return "lmtrain " + shlex.join(case.args)
