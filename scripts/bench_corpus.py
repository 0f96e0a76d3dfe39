"""Benchmark the token cache on a generated corpus of ~200 MB: first tokenization, second start, peak RSS.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=268435456 \\
        python scripts/bench_corpus.py [--megabytes 200] [--levels char word] [--in-memory char] \\
            [--doc docs/benchmarks.md]

For each level it writes a corpus into a temporary folder (deleted at the end, with the cache built
there): word level, random words from a generated 5,000-word vocabulary in lines of 3 to 20 words;
char level, the same kind of lines over an alphabet with accented and Greek letters (2-byte UTF-8).
Then it measures
  - the first tokenization (hash, count pass, encode pass, written to the cache), in this process;
  - the second start: a fresh process that finds the entry and maps the ids (`load_corpus`);
  - a real `lmtrain train` run (a small LSTM, a few steps), first with an empty cache and then again:
    its wall time and peak RSS (VmHWM), minus that of a process that imports lmtrain and torch, builds
    the same model, and runs a training step and an evaluation of the same shapes on random ids: what
    is left is what the corpus costs.
`--in-memory LEVEL...` adds a run with `data.cache: false` (the text read whole) for comparison. `--doc` writes
the markdown section into that file, replacing an earlier "Corpora of any size" section.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from comparison import ALLOCATOR, allocator_settings, doc_file, positive_number
from doc_sections import write_section

from lmtrain.config import load_config
from lmtrain.data.cache import cached_corpus

SECTION = "Corpora of any size"
CONFIG = """\
data:
  path: corpus.txt
  split: [0.999, 0.001]   # a 200 KB validation split: evaluation stays quick
  level: {level}
model:
  cell: lstm
  embed_size: 32
  hidden_size: 64
  num_layers: 1
train:
  batch_size: 32
  bptt: 64
  max_steps: 5
  eval_every: 1000
  final_samples: 0
  device: cpu
"""
PEAK = """\
import atexit, runpy, sys
atexit.register(lambda: sys.stderr.write("VmHWM " + [line.split()[1] for line in open("/proc/self/status")
                                                    if line.startswith("VmHWM")][0] + "\\n"))
sys.argv = ["lmtrain", *sys.argv[1:]]
runpy.run_module("lmtrain", run_name="__main__", alter_sys=True)
"""
BASELINE = """\
import sys
import torch
from lmtrain.config import load_config
from lmtrain.data.dataset import stream_segments
from lmtrain.evaluation.perplexity import score
from lmtrain.model.language_model import LanguageModel
from lmtrain.training.optim import build_optimizer
import lmtrain.training.trainer
config = load_config("bench.yaml")
vocab_size, valid_tokens = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
model = LanguageModel.from_config(config.model, vocab_size)
optimizer = build_optimizer(model, config.train)
batch = torch.randint(vocab_size, (config.train.batch_size, config.train.bptt + 1))
for _ in range(2):  # training steps of the run's shape (the second with the optimizer state), on random ids
    total, _ = model(batch[:, :-1], None, targets=batch[:, 1:])
    optimizer.zero_grad()
    (total / batch[:, 1:].numel()).backward()
    optimizer.step()
score(model, stream_segments(torch.randint(vocab_size, (valid_tokens,)), config.train.eval_segment))
print([line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")][0])
"""
SECOND_START = """\
import sys, time
begin = time.perf_counter()
from lmtrain.data.cache import load_corpus
from lmtrain.config import load_config
imported = time.perf_counter()
load_corpus(load_config("bench.yaml").data)
print(time.perf_counter() - imported, imported - begin)
"""


def write_corpus(path: Path, *, level: str, megabytes: float, seed: int = 0) -> None:
    """~`megabytes` of lines of 3 to 20 words: random lines drawn from a pool of 50,000 (fast to make)."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz" + ("éèàüößçñαβγδεζ" if level == "char" else "")
    vocabulary = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 10))) for _ in range(5000)]
    pool = [" ".join(rng.choices(vocabulary, k=rng.randint(3, 20))) + "\n" for _ in range(50_000)]
    target, written = megabytes * 1e6, 0
    with path.open("w", encoding="utf-8") as file:
        while written < target:
            chunk = "".join(rng.choices(pool, k=20_000))
            file.write(chunk)
            written += len(chunk.encode("utf-8"))


def run(arguments: list[str], *, cwd: Path, environment: dict) -> tuple[subprocess.CompletedProcess, float]:
    begin = time.perf_counter()
    result = subprocess.run(arguments, cwd=cwd, env=environment, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(arguments)} failed:\n{result.stdout}\n{result.stderr}")
    return result, time.perf_counter() - begin


def train_peak(folder: Path, environment: dict, *overrides: str) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of `lmtrain train bench.yaml` in a fresh process."""
    out_dir = tempfile.mkdtemp(prefix="run-", dir=folder)
    result, seconds = run([sys.executable, "-c", PEAK, "train", "bench.yaml", f"train.out_dir={out_dir}",
                           "--no-progress", *overrides], cwd=folder, environment=environment)
    return seconds, int(re.search(r"VmHWM (\d+)", result.stderr).group(1)) / 1024


def bench_level(level: str, work: Path, megabytes: float, in_memory: bool) -> dict:
    folder = work / level
    folder.mkdir()
    corpus = folder / "corpus.txt"
    write_corpus(corpus, level=level, megabytes=megabytes)
    (folder / "bench.yaml").write_text(CONFIG.format(level=level), encoding="utf-8")
    size = corpus.stat().st_size / 1e6
    config = load_config(folder / "bench.yaml")
    environment = {**os.environ, "LMTRAIN_CACHE": str(folder / "cache-a")}
    os.environ["LMTRAIN_CACHE"] = environment["LMTRAIN_CACHE"]
    begin = time.perf_counter()
    first = cached_corpus(config.data)
    tokenize_seconds = time.perf_counter() - begin
    tokens = sum(ids.numel() for ids in first.splits.values())
    dtype = str(first.splits["train"].dtype).split(".")[1]
    vocab_size, valid_tokens = first.tokenizer.vocab_size, first.splits["valid"].numel()
    del first
    hit, _ = run([sys.executable, "-c", SECOND_START], cwd=folder, environment=environment)
    hit_seconds, import_seconds = map(float, hit.stdout.split())
    baseline = int(run([sys.executable, "-c", BASELINE, str(vocab_size), str(valid_tokens)], cwd=folder,
                       environment=environment)[0].stdout.strip().splitlines()[-1]) / 1024
    fresh = {**environment, "LMTRAIN_CACHE": str(folder / "cache-b")}  # an empty cache: the run tokenizes
    first_wall, first_peak = train_peak(folder, fresh)
    second_wall, second_peak = train_peak(folder, fresh)
    memory = train_peak(folder, fresh, "data.cache=false") if in_memory else None
    corpus.unlink()
    return {"level": level, "megabytes": size, "tokens": tokens, "vocab_size": vocab_size, "dtype": dtype,
            "tokenize_seconds": tokenize_seconds, "hit_seconds": hit_seconds, "import_seconds": import_seconds,
            "baseline": baseline, "first": (first_wall, first_peak - baseline),
            "second": (second_wall, second_peak - baseline),
            "memory": (memory[0], memory[1] - baseline) if memory else None}


def section(command: str, rows: list[dict]) -> str:
    allocator = allocator_settings()
    lines = [f"`{command}`", "",
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
             f"allocator: {allocator}; load average at the end {os.getloadavg()[1]:.1f} (a shared machine: "
             f"wall times are noisy)", "",
             "| level | corpus MB | tokens | vocabulary (ids) | first tokenization s (MB/s) | second start s | "
             "`lmtrain train` s, first / second | peak RSS MB beyond the model, first / second |",
             "|---|---:|---:|---|---:|---:|---|---|"]
    for row in rows:
        lines.append(f"| {row['level']} | {row['megabytes']:.0f} | {row['tokens']:,} | {row['vocab_size']:,} "
                     f"({row['dtype']}) | {row['tokenize_seconds']:.1f} "
                     f"({row['megabytes'] / row['tokenize_seconds']:.1f}) | "
                     f"{row['hit_seconds']:.3f} | {row['first'][0]:.1f} / {row['second'][0]:.1f} | "
                     f"{row['first'][1]:.0f} / {row['second'][1]:.0f} |")
    lines += ["", textwrap.fill(
        "First tokenization: `cached_corpus` with an empty cache, in one process: hashing the file, a decode-only "
        "pass for the length (the split cuts depend on it), pass 1 counting the training split's vocabulary, "
        "pass 2 writing the ids (fsynced). Second start: a fresh process calling `load_corpus` on the same corpus, "
        "timed after its imports (which take "
        + ", ".join(f"{row['import_seconds']:.1f} s" for row in rows)
        + "): the file's record spares the hash, the ids are memory-mapped. `lmtrain train` runs "
        "`data.split: [0.999, 0.001]`, an LSTM 1x64 with embedding 32, batch 32 x bptt 64, 5 steps and one "
        "evaluation; first with an empty cache (so it tokenizes), then again. Peak RSS is VmHWM of that process "
        "minus VmHWM of one that imports lmtrain and torch, builds the same model and optimizer and runs two "
        "training steps and an evaluation of the same shapes on random ids "
        "(" + ", ".join(f"{row['baseline']:.0f} MB" for row in rows) + "); mapped pages of the ids file count in it.",
        width=110)]
    char = [row for row in rows if row["level"] == "char"]
    worst = max(max(row["first"][1], row["second"][1]) for row in rows)
    lines += ["", textwrap.fill("Against the targets: the first tokenization at char level at >= 20 MB/s: "
              + (f"{'met' if char[0]['megabytes'] / char[0]['tokenize_seconds'] >= 20 else 'NOT met'} "
                 f"({char[0]['megabytes'] / char[0]['tokenize_seconds']:.1f} MB/s)" if char else "not measured")
              + f"; the second start under a second: {'met' if max(r['hit_seconds'] for r in rows) < 1 else 'NOT met'} "
              f"({max(r['hit_seconds'] for r in rows):.3f} s, after the imports every lmtrain command pays); "
              f"peak RSS under 1 GB beyond the model: {'met' if worst < 1024 else 'NOT met'} (at most {worst:.0f} MB).",
              width=110)]
    memory = [row for row in rows if row["memory"]]
    if memory:
        lines += ["", textwrap.fill("For comparison, the same run with `data.cache: false` (the text read whole, ids "
                  "as int32): " + "; ".join(f"{row['level']} level {row['memory'][0]:.1f} s, peak RSS "
                                            f"{row['memory'][1]:.0f} MB beyond the model" for row in memory) + ".",
                  width=110)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=positive_number, default=200)
    parser.add_argument("--levels", nargs="+", default=["char", "word"], choices=["char", "word"])
    parser.add_argument("--in-memory", nargs="*", default=[], choices=["char", "word"],
                        help="at these levels also train once with data.cache: false (minutes and GBs at word level)")
    parser.add_argument("--doc", type=doc_file, default=None, help="write the markdown section into this file")
    args = parser.parse_args()
    allocator = " ".join(f"{name}={os.environ[name]}" for name in ALLOCATOR if name in os.environ)
    command = f"{allocator} python scripts/bench_corpus.py {shlex.join(sys.argv[1:])}".strip()
    print(f"allocator: {allocator or 'glibc defaults'}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="lmtrain-bench-corpus-"))
    try:
        rows = []
        for level in args.levels:
            rows.append(bench_level(level, work, args.megabytes, level in args.in_memory))
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the corpora and caches: several hundred MB
    text = section(command, rows)
    print(text)
    if args.doc:
        write_section(args.doc, SECTION, text)


if __name__ == "__main__":
    main()
