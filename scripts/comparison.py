"""What the same-job comparisons share (compare_shakespeare.py, compare_ptb_epoch.py): the machine line,
one `lmtrain train` run in a fresh process, and the results table; what every benchmark prints, the
allocator settings it ran with; and how the scripts check their arguments and run their child processes:
bad input is argparse's one-line error before any measuring starts, and a failed child is its own last
line, not a traceback.

lmtrain is imported inside the functions that use it: scripts/reference_nn_lstm.py uses the argument
types here and must measure torch alone."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch

ROOT = Path(__file__).resolve().parent.parent
ALLOCATOR = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
PTB_FILES = tuple(f"ptb.{split}.txt" for split in ("train", "valid", "test"))


def layer_sizes(text: str) -> list[tuple[int, int, int]]:
    """The `--sizes` argument of the layer benchmarks: a JSON list of [B, T, H], each a positive integer.
    A malformed one is argparse's one-line error, not a traceback."""
    try:
        sizes = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error}); write e.g. \"[[32, 64, 128], [1, 256, 512]]\"") from None
    if not (isinstance(sizes, list) and sizes and all(
            isinstance(size, list) and len(size) == 3
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size) for size in sizes)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of [B, T, H] with positive integers; write e.g. "
                                         f"\"[[32, 64, 128], [1, 256, 512]]\"")
    return [tuple(size) for size in sizes]


def integer_at_least(minimum: int, why: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number of `minimum` or more (a count of steps, rounds, repeats); `why`
    says in the error what needs that many."""
    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more{f' ({why})' if why else ''}; got {value}")
        return value
    return count


positive_integer = integer_at_least(1)


def positive_number(text: str) -> float:
    """An argparse type: a finite number above 0 (seconds, megabytes)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number above 0; got {text}")
    return value


def text_file(text: str) -> Path:
    """An argparse type: a file that is there (a corpus, a checkpoint)."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: {'not a file' if path.exists() else 'no such file'}")
    return path


def ptb_folder(text: str) -> Path:
    """An argparse type: the folder of Penn Treebank's three files."""
    path = Path(text)
    missing = [name for name in PTB_FILES if not (path / name).is_file()]
    if missing:
        raise argparse.ArgumentTypeError(f"{text}: no {', '.join(missing)} there (the folder of Penn Treebank's "
                                         f"three files)")
    return path


def corpus(text: str) -> Path:
    """An argparse type: a text file (lmtrain cuts it by data.split) or the folder of Penn Treebank's files."""
    return ptb_folder(text) if Path(text).is_dir() else text_file(text)


def corpus_settings(path: Path) -> list[str]:
    """The overrides that train lmtrain on a `corpus` argument: the file as data.path, or the folder's
    ptb.{train,valid,test}.txt; absolute, since the child processes run from the repository root."""
    path = path.resolve()
    if path.is_dir():
        return ["data.corpus=null", *(f"data.{name.split('.')[1]}={path / name}" for name in PTB_FILES)]
    return ["data.corpus=null", f"data.path={path}"]


def lmtrain_checkout(text: str) -> Path:
    """An argparse type: a checkout of another lmtrain version (`git worktree add /tmp/before COMMIT`)."""
    path = Path(text)
    if not (path / "lmtrain" / "__init__.py").is_file():
        raise argparse.ArgumentTypeError(f"{text}: not an lmtrain checkout (no lmtrain/__init__.py there)")
    return path


def doc_file(text: str) -> Path:
    """An argparse type: the Markdown file a table is written into at the end, checked before the measuring
    starts, so that a typo in its folder does not cost the run."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: a folder, not a file")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no folder {path.parent}")
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text}: cannot be written")
    return path


def checked_config(parser: argparse.ArgumentParser, path: str | Path, overrides: list[str]):
    """The lmtrain config `path` with `overrides`, read by lmtrain's own loader; what it refuses (a missing
    file, an unknown key, a bad value) is argparse's one-line error now, not a traceback or a child's
    failure after the first measurements."""
    from lmtrain.config import load_config
    from lmtrain.errors import LmtrainError

    try:
        return load_config(path, overrides)
    except LmtrainError as error:
        parser.error(str(error))


def repository_path(path: str | Path) -> str:
    """`path` as a table shows it: relative to the repository root where it lies inside it."""
    absolute = Path(path).resolve()
    return str(absolute.relative_to(ROOT)) if absolute.is_relative_to(ROOT) else str(path)


def child_failed(command: list[str], returncode: int, output: str) -> NoReturn:
    """Stop this script because a child process failed: its exit status and command, then the child's own
    last line (lmtrain's `error: ...`)."""
    last = next((line for line in reversed(output.splitlines()) if line.strip()), "(it printed nothing)")
    sys.exit(f"failed ({returncode}): {shlex.join(map(str, command))}\n{last}")


def run_child(command: list[str], **options) -> subprocess.CompletedProcess:
    """`command` run to its end with its output captured, as text unless `text=False` (`options` as
    subprocess.run's: cwd, env, timeout); a failure stops this script through `child_failed`, not with a
    CalledProcessError."""
    try:
        done = subprocess.run(command, capture_output=True, **{"text": True, **options})
    except subprocess.TimeoutExpired as error:
        sys.exit(f"timed out after {error.timeout:g} s: {shlex.join(map(str, command))}")
    if done.returncode != 0:
        output = done.stderr if done.stderr.strip() else done.stdout
        child_failed(command, done.returncode, output if isinstance(output, str) else output.decode(errors="replace"))
    return done


def allocator_settings() -> str:
    """The glibc allocator variables in effect, as the benchmarks print them."""
    return ", ".join(f"{name}={os.environ[name]}" for name in ALLOCATOR if name in os.environ) or "glibc defaults"


def provenance() -> str:
    """When and from what code a table was made: the date and the commit (noting uncommitted changes)."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return f"{time.strftime('%Y-%m-%d')}, commit {commit}{' with uncommitted changes' if dirty else ''}"


def baseline_note(checkout: Path) -> str:
    """The line under a table that ran another lmtrain checkout beside this one."""
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    return f"The baseline is lmtrain at commit {commit}, run from its own checkout."


def cpu_name() -> str:
    """The processor's model name (/proc/cpuinfo) and its widest vector instructions, else the architecture:
    ratios against torch.nn depend on them (docs/benchmarks.md: the same code on AMD and Intel hosts, and on
    two "AMD EPYC"s, one with AVX-512 and one without)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    if not names:
        return platform.processor() or platform.machine()
    flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    vectors = ("AVX-512" + (" BF16" if "avx512_bf16" in flags else "") if "avx512f" in flags
               else "AVX2" if "avx2" in flags else None)
    return f"{platform.machine()} {names[0]}" + (f" ({vectors})" if vectors else "")


def machine_line() -> str:
    return (f"# {platform.node()}: {os.cpu_count()} CPUs, {cpu_name()}, torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads; "
            + ", ".join(f"{name}={os.environ.get(name, 'unset')}" for name in ALLOCATOR))


def run_subprocess(command: list[str]) -> tuple[str, float]:
    """stdout and wall seconds of `command`, run from the repository root (`run_child`)."""
    begin = time.perf_counter()
    done = run_child(command, cwd=ROOT)
    return done.stdout, time.perf_counter() - begin


def lmtrain_settings(settings: list[str], out_dir: Path) -> list[str]:
    """What `run_lmtrain` adds to a run's own settings: evaluated once at the end, on the whole validation
    split with the state carried, no checkpoints or samples before."""
    from lmtrain.evaluation.perplexity import WHOLE_TEXT  # as train.eval_segment: one segment, the state carried

    return [*settings, f"train.eval_segment={WHOLE_TEXT}", f"train.eval_every={10**9}",
            f"train.checkpoint_every={10**9}", "train.final_samples=0", f"train.out_dir={out_dir}"]


def run_lmtrain(config: str | Path, settings: list[str], overrides: list[str], out_dir: Path) -> dict:
    """`lmtrain train config *settings *overrides` into out_dir (`lmtrain_settings`); its steps, training
    seconds, tokens/s and validation loss."""
    command = [sys.executable, "-m", "lmtrain", "train", str(config), *lmtrain_settings(settings, out_dir), *overrides]
    _, wall = run_subprocess(command)
    return {"name": f"lmtrain `{' '.join([repository_path(config), *overrides])}`", **train_result(out_dir),
            "wall_seconds": round(wall)}


def train_result(out_dir: Path) -> dict:
    """A finished run folder's steps, training seconds, tokens/s and last validation loss and perplexity."""
    events = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    valid = [event for event in events if event["split"] == "valid"][-1]
    progress = torch.load(out_dir / "last.pt", weights_only=True, map_location="cpu")["progress"]
    return {"steps": progress["step"], "train_seconds": round(progress["train_seconds"], 1),
            "tokens_per_s": round(progress["tokens"] / progress["train_seconds"]), "valid_loss": valid["loss"],
            "valid_ppl": valid["ppl"]}


def print_table(results: list[dict], title: str, *, perplexity: bool = False) -> None:
    score = "valid perplexity" if perplexity else "valid loss (nats/char)"
    print(f"\n| {title} | steps | training s | tokens/s | {score} | wall s |")
    print("|---|---|---|---|---|---|")
    for result in results:
        value = f"{2.718281828459045 ** result['valid_loss']:.2f}" if perplexity else f"{result['valid_loss']:.4f}"
        print(f"| {result['name']} | {result['steps']:,} | {result['train_seconds']:.1f} | "
              f"{result['tokens_per_s']:,} | {value} | {result['wall_seconds']} |")
