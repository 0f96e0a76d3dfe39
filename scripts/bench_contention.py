"""Training speed on a busy machine: lmtrain and the `nn.LSTM` reference with 0, 1 and 2 competing
CPU-bound processes, at their default threads and at fixed thread counts, alternating in one job.

    python scripts/bench_contention.py PATH/TO/tinyshakespeare/input.txt [--seconds 20] [--rounds 2]
        [--baseline CHECKOUT] [--doc docs/running.md]

Each round starts the competitors (`python -c "while True: pass"`, free to run on any core), then runs
every variant for `--seconds` of training: `scripts/reference_nn_lstm.py` at torch's default threads and
at OMP_NUM_THREADS=1, and `lmtrain train configs/tinyshakespeare-char.yaml` (2x256 LSTM, batch 32,
float32) at its default (`train.threads: auto`) and at `train.threads` 1 and 2; the variants' order is
reversed every other round. With `--baseline`, a checkout of another lmtrain version (`git worktree add
/tmp/before COMMIT`) runs too, at its defaults, from its own folder (PYTHONPATH), to show what a change
did. tokens/s counts training steps alone (start-up and evaluation left out).
The table gives medians over the rounds, the threads lmtrain's `auto` used, and the two ratios that
matter: auto against lmtrain's best fixed count under the same load, and against the reference at its
default.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from comparison import (
    ROOT,
    allocator_settings,
    baseline_note,
    cpu_name,
    doc_file,
    lmtrain_checkout,
    positive_integer,
    positive_number,
    provenance,
    run_child,
    text_file,
)
from doc_sections import write_section

LOADS = (0, 1, 2)
# (name, program, threads: None for the program's default)
VARIANTS = (("reference, default threads", "reference", None), ("reference, 1 thread", "reference", 1),
            ("lmtrain, default (auto)", "lmtrain", None), ("lmtrain, threads 1", "lmtrain", 1),
            ("lmtrain, threads 2", "lmtrain", 2))


def clean_environment(**extra: str) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    return {**environment, **extra}


def run_reference(corpus: Path, seconds: float, threads: int | None) -> tuple[float, str]:
    environment = clean_environment(**({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    done = run_child([sys.executable, str(ROOT / "scripts" / "reference_nn_lstm.py"), str(corpus),
                      "--seconds", str(seconds)], env=environment)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["tokens_per_s"], str(result["threads"])


def run_lmtrain(corpus: Path, seconds: float, threads: int | None, checkout: Path = ROOT) -> tuple[float, str]:
    environment = clean_environment(**({"PYTHONPATH": str(checkout)} if checkout != ROOT else {}))
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "lmtrain", "train", str(checkout / "configs" / "tinyshakespeare-char.yaml"),
                   f"data.path={corpus.resolve()}", f"train.max_seconds={seconds}", "train.eval_every=1000000",
                   "train.checkpoint_every=1000000", "train.log_every=10", "train.final_samples=0",
                   f"train.out_dir={folder}/run", "--no-progress", *([f"train.threads={threads}"] if threads else [])]
        run_child(command, env=environment, cwd=folder)
        progress = torch.load(Path(folder) / "run" / "last.pt", weights_only=True)["progress"]
        events = [json.loads(line) for line in (Path(folder) / "run" / "metrics.jsonl").read_text().splitlines()]
        used = sorted({event.get("threads", "?") for event in events if event["split"] == "train"}, key=str)
        return progress["tokens"] / progress["train_seconds"], "/".join(map(str, used))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", type=text_file, help="Tiny Shakespeare's input.txt")
    parser.add_argument("--seconds", type=positive_number, default=20.0)
    parser.add_argument("--rounds", type=positive_integer, default=2)
    parser.add_argument("--baseline", type=lmtrain_checkout, default=None, help="a checkout of another lmtrain version")
    parser.add_argument("--doc", type=doc_file, default=None, help="write the table into this file's section "
                        "\"Training beside other processes\"")
    args = parser.parse_args()
    variants = VARIANTS + ((("lmtrain baseline, its defaults", "baseline", None),) if args.baseline else ())
    speeds: dict[tuple[str, int], list[float]] = defaultdict(list)
    used: dict[tuple[str, int], set[str]] = defaultdict(set)
    for round_index in range(args.rounds):
        for load in LOADS:
            competitors = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
            try:
                for variant, program, count in variants if round_index % 2 == 0 else reversed(variants):
                    if program == "reference":
                        tokens_per_s, threads = run_reference(args.corpus, args.seconds, count)
                    else:
                        checkout = args.baseline.resolve() if program == "baseline" else ROOT
                        tokens_per_s, threads = run_lmtrain(args.corpus, args.seconds, count, checkout)
                    speeds[variant, load].append(tokens_per_s)
                    used[variant, load].add(threads)
                    print(f"round {round_index + 1}, {load} competing: {variant}: {tokens_per_s:,.0f} tokens/s "
                          f"({threads} {'thread' if threads == '1' else 'threads'})", flush=True)
            finally:
                for competitor in competitors:
                    competitor.kill()
                    competitor.wait()
    median = {key: statistics.median(values) for key, values in speeds.items()}
    header = " | ".join(f"{load} competing" for load in LOADS)
    lines = [f"`python scripts/bench_contention.py {shlex.join(sys.argv[1:])}` ({provenance()})",
             f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, allocator: "
             f"{allocator_settings()}; tokens/s, medians of {args.rounds} alternating rounds of {args.seconds:g} s of "
             f"training each (every round in parentheses)", "",
             f"| trainer | {header} |", "|---|" + "---:|" * len(LOADS)]
    for variant, _, _ in variants:
        cells = []
        for load in LOADS:
            rounds = ", ".join(f"{value:,.0f}" for value in speeds[variant, load])
            threads = "; ".join(sorted(used[variant, load]))
            note = (f", {threads} {'thread' if threads == '1' else 'threads'}"
                    if variant == "lmtrain, default (auto)" else "")
            cells.append(f"{median[variant, load]:,.0f} ({rounds}{note})")
        lines.append(f"| {variant} | {' | '.join(cells)} |")
    best = {load: max(median["lmtrain, threads 1", load], median["lmtrain, threads 2", load]) for load in LOADS}
    lines.append("| lmtrain auto / its best fixed count | "
                 + " | ".join(f"{median['lmtrain, default (auto)', load] / best[load]:.2f}x" for load in LOADS) + " |")
    lines.append("| lmtrain auto / reference default | " + " | ".join(
        f"{median['lmtrain, default (auto)', load] / median['reference, default threads', load]:.2f}x"
        for load in LOADS) + " |")
    if args.baseline:
        lines.append("| lmtrain auto / the baseline's defaults | " + " | ".join(
            f"{median['lmtrain, default (auto)', load] / median['lmtrain baseline, its defaults', load]:.2f}x"
            for load in LOADS) + " |")
        lines += ["", baseline_note(args.baseline)]
    print("\n".join(lines))
    if args.doc:
        write_section(args.doc, "Training beside other processes", "\n".join(lines))


if __name__ == "__main__":
    main()
