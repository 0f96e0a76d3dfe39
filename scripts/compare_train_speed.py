"""Whole training runs, lmtrain against the nn.LSTM reference, same settings, alternating in one job.

    python scripts/compare_train_speed.py PATH/TO/tinyshakespeare/input.txt [--steps 300] [--rounds 3]
        [--doc FILE] [override ...]

Each round runs `scripts/reference_nn_lstm.py --steps N` and then `lmtrain train
configs/tinyshakespeare-char.yaml data.path=PATH train.max_steps=N` (plus any overrides), each in its own
process, and reads both runs' training tokens/s over their steps alone (start-up and evaluation left
out: the reference's own count, and lmtrain's `progress.tokens / progress.train_seconds` from the
checkpoint). The machine stalls at times, so the rounds alternate and the table gives medians and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from comparison import (
    ROOT,
    allocator_settings,
    checked_config,
    corpus_settings,
    cpu_name,
    doc_file,
    positive_integer,
    run_child,
    text_file,
)
from doc_sections import write_section

CONFIG = ROOT / "configs" / "tinyshakespeare-char.yaml"


def reference_tokens_per_s(corpus: Path, steps: int) -> float:
    result = run_child([sys.executable, str(ROOT / "scripts" / "reference_nn_lstm.py"), str(corpus),
                        "--steps", str(steps)])
    return json.loads(result.stdout.strip().splitlines()[-1])["tokens_per_s"]


def run_settings(corpus: Path, steps: int, out_dir: str) -> list[str]:
    """The settings of a `lmtrain train CONFIG` run of `steps` steps on `corpus`, before the overrides."""
    return [*corpus_settings(corpus), f"train.max_steps={steps}", "train.max_seconds=null",
            f"train.eval_every={10 * steps}", f"train.checkpoint_every={10 * steps}", "train.final_samples=0",
            f"train.out_dir={out_dir}"]


def lmtrain_tokens_per_s(corpus: Path, steps: int, overrides: list[str],
                         launcher: tuple[str, ...] = (sys.executable, "-m", "lmtrain")) -> float:
    """Training tokens/s of one `lmtrain train` run in its own process; `launcher` is the command that
    stands for `lmtrain` (scripts/compare_gemms.py sets a switch of the route's first)."""
    with tempfile.TemporaryDirectory() as folder:
        run_child([*launcher, "train", str(CONFIG), *run_settings(corpus, steps, f"{folder}/run"), *overrides])
        progress = torch.load(Path(folder) / "run" / "last.pt", weights_only=True)["progress"]
        return progress["tokens"] / progress["train_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", type=text_file, help="Tiny Shakespeare's input.txt")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for lmtrain")
    parser.add_argument("--steps", type=positive_integer, default=300)
    parser.add_argument("--rounds", type=positive_integer, default=3)
    parser.add_argument("--doc", type=doc_file, default=None, help="write the table into this file's section "
                        "\"Whole training runs\"")
    args = parser.parse_intermixed_args()  # overrides may come before or after the options
    checked_config(parser, CONFIG, [*run_settings(args.corpus, args.steps, "run"), *args.overrides])
    speeds: dict[str, list[float]] = {"nn.LSTM reference": [], "lmtrain": []}
    for _ in range(args.rounds):
        speeds["nn.LSTM reference"].append(reference_tokens_per_s(args.corpus, args.steps))
        speeds["lmtrain"].append(lmtrain_tokens_per_s(args.corpus, args.steps, args.overrides))
        print({name: round(values[-1]) for name, values in speeds.items()}, flush=True)
    median = {name: statistics.median(values) for name, values in speeds.items()}
    allocator = allocator_settings()
    lines = [f"`python scripts/compare_train_speed.py {shlex.join(sys.argv[1:])}`",
             f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, allocator: {allocator}; "
             f"{args.rounds} alternating rounds of {args.steps} steps each", "",
             "| trainer | tokens/s (median) | every round | lmtrain / reference |", "|---|---:|---|---:|"]
    for name, values in speeds.items():
        ratio = median["lmtrain"] / median["nn.LSTM reference"]
        lines.append(f"| {name} | {median[name]:,.0f} | {', '.join(f'{v:,.0f}' for v in values)} | "
                     f"{ratio:.2f}x |" if name == "lmtrain" else
                     f"| {name} | {median[name]:,.0f} | {', '.join(f'{v:,.0f}' for v in values)} | |")
    lines += ["", "`scripts/reference_nn_lstm.py` is a plain PyTorch trainer on `nn.LSTM` (embedding 64, 2x256, "
              "batch 32, bptt 64, Adam 2e-3, clip 5), the settings of `configs/tinyshakespeare-char.yaml`, which "
              "lmtrain runs with `train.max_steps` set; both count tokens/s over their training steps alone."]
    print("\n".join(lines))
    if args.doc:
        write_section(args.doc, "Whole training runs", "\n".join(lines))


if __name__ == "__main__":
    main()
