"""Peak memory (resident set size) of training, evaluation and sampling, against vocabulary and model
size, for word-level models on a generated corpus.

    python scripts/bench_memory.py [--vocab 2000 14000 50000] [--steps 40] [--baseline CHECKOUT]
        [--doc docs/benchmarks.md]

The corpus: 214,000 training and 20,000 validation tokens of words drawn from a Zipf distribution over
the vocabulary size asked for (lines of 5 to 25 words), generated here. Each command runs in a process
of its own and its own peak is read with wait4(2): `lmtrain train` (the defaults, batch 32 x 64 tokens,
`train.max_steps` steps and one evaluation of the validation split at the end), `lmtrain eval
perplexity` on the checkpoint, `lmtrain sample --num 16`. The first row is the floor every command
stands on: Python with torch imported and an Adam optimizer built (which loads torch._dynamo).
With `--baseline`, the same commands of another lmtrain checkout (`git worktree add /tmp/before
COMMIT`) run too, from its own folder, to show what a change did.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from comparison import (
    ROOT,
    allocator_settings,
    baseline_note,
    child_failed,
    doc_file,
    lmtrain_checkout,
    positive_integer,
    provenance,
)
from doc_sections import write_section

MODELS = {"2x200, tied": {"model.embed_size": 200, "model.hidden_size": 200, "model.num_layers": 2,
                          "model.tie_weights": True},
          "2x650, tied": {"model.embed_size": 650, "model.hidden_size": 650, "model.num_layers": 2,
                          "model.tie_weights": True}}
FLOOR = "import torch; torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])"


def allocator() -> str:
    """The MALLOC_* variables set, or lmtrain's own settings, which apply when none is."""
    if any(name.startswith("MALLOC_") for name in os.environ):
        return allocator_settings()
    return "lmtrain's own settings (no MALLOC_* variable set; `lmtrain/speed/memory.py`)"


def write_corpus(path: Path, vocabulary: int, tokens: int, seed: int) -> None:
    rng = random.Random(seed)
    words = [f"w{index}" for index in range(vocabulary)]
    weights = [1 / (rank + 1) for rank in range(vocabulary)]
    lines, count = [], 0
    while count < tokens:
        line = rng.choices(words, weights, k=rng.randint(5, 25))
        lines.append(" ".join(line))
        count += len(line) + 1
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def peak_mb(command: list[str], *, cwd: Path, checkout: Path = ROOT) -> float:
    """The peak resident set size of `command`'s own process, in MB."""
    environment = {**os.environ, **({"PYTHONPATH": str(checkout)} if checkout != ROOT else {})}
    process = subprocess.Popen(command, cwd=cwd, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        child_failed(command, os.waitstatus_to_exitcode(status), process.stderr.read().decode())
    return usage.ru_maxrss / 1024


def measure(folder: Path, vocabulary: int, model: dict, steps: int, checkout: Path) -> dict[str, float]:
    config = folder / "config.yaml"
    config.write_text("data: {train: train.txt, valid: valid.txt, level: word}\n", encoding="utf-8")
    run = folder / f"run-{checkout.name}-{model['model.hidden_size']}"
    lmtrain = [sys.executable, "-m", "lmtrain"]
    train = [*lmtrain, "train", str(config), "--no-progress", f"train.max_steps={steps}", f"train.eval_every={steps}",
             "train.final_samples=0", f"train.out_dir={run}", *(f"{key}={value}" for key, value in model.items())]
    measured = {"train": peak_mb(train, cwd=folder, checkout=checkout),
            "eval": peak_mb([*lmtrain, "eval", "perplexity", "--checkpoint", str(run / "best.pt")], cwd=folder,
                            checkout=checkout),
            "sample": peak_mb([*lmtrain, "sample", "--checkpoint", str(run / "best.pt"), "--num", "16"], cwd=folder,
                              checkout=checkout)}
    measured["words"] = len(torch.load(run / "best.pt", weights_only=True)["tokenizer"]["tokens"])
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=positive_integer, nargs="+", default=[2000, 14000, 50000])
    parser.add_argument("--steps", type=positive_integer, default=40)
    parser.add_argument("--baseline", type=lmtrain_checkout, default=None)
    parser.add_argument("--doc", type=doc_file, default=None, help="write the table into this file's section "
                        "\"Memory\"")
    args = parser.parse_args()
    checkouts = [ROOT] + ([args.baseline.resolve()] if args.baseline else [])
    floor = peak_mb([sys.executable, "-c", FLOOR], cwd=ROOT)
    header = "| vocabulary (words seen) | model | train MB | eval MB | sample MB |" + (
        " baseline train / eval / sample MB |" if args.baseline else "")
    lines = [f"`python scripts/bench_memory.py {shlex.join(sys.argv[1:])}` ({provenance()})",
             f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, allocator: {allocator()}; "
             f"peak resident set size of each command's process", "",
             header, "|---:|---|---:|---:|---:|" + ("---|" if args.baseline else ""),
             f"| (Python, torch and an optimizer: the floor) | | {floor:,.0f} | | |" + (" |" if args.baseline else "")]
    for vocabulary in args.vocab:
        with tempfile.TemporaryDirectory() as name:
            folder = Path(name)
            write_corpus(folder / "train.txt", vocabulary, 214_000, seed=1)
            write_corpus(folder / "valid.txt", vocabulary, 20_000, seed=2)
            for label, model in MODELS.items():
                results = [measure(folder, vocabulary, model, args.steps, checkout) for checkout in checkouts]
                row = f"| {results[0]['words']:,} | {label} | " + " | ".join(f"{results[0][k]:,.0f}"
                                                                             for k in ("train", "eval", "sample"))
                if args.baseline:
                    row += " | " + " / ".join(f"{results[1][k]:,.0f}" for k in ("train", "eval", "sample"))
                lines.append(row + " |")
                print(lines[-1], flush=True)
    if args.baseline:
        lines += ["", baseline_note(args.baseline)]
    print("\n".join(lines))
    if args.doc:
        write_section(args.doc, "Memory", "\n".join(lines))


if __name__ == "__main__":
    main()
