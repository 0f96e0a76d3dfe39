"""What the same-job comparisons share (compare_shakespeare.py, compare_ptb_epoch.py): the machine line,
one `lmtrain train` run in a fresh process, and the results table; and what every benchmark prints, the
allocator settings it ran with."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from lmtrain.evaluation.perplexity import WHOLE_TEXT  # as train.eval_segment: one segment, the state carried through it

ROOT = Path(__file__).resolve().parent.parent
ALLOCATOR = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


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
    """stdout and wall seconds of `command`, run from the repository root; its stderr if it fails."""
    begin = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
    return done.stdout, time.perf_counter() - begin


def run_lmtrain(config: str, settings: list[str], overrides: list[str], out_dir: Path) -> dict:
    """`lmtrain train config *settings *overrides` into out_dir, evaluated once at the end on the whole
    validation split with the state carried; its steps, training seconds, tokens/s and validation loss."""
    command = [sys.executable, "-m", "lmtrain", "train", config, *settings, f"train.eval_segment={WHOLE_TEXT}",
               f"train.eval_every={10**9}", f"train.checkpoint_every={10**9}", "train.final_samples=0",
               f"train.out_dir={out_dir}", *overrides]
    _, wall = run_subprocess(command)
    return {"name": f"lmtrain `{' '.join([config, *overrides])}`", **train_result(out_dir), "wall_seconds": round(wall)}


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
