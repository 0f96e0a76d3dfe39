#!/usr/bin/env python
"""Two lmtrain versions on the same runs, alternating in one job: the quickstart, the 68 s Tiny
Shakespeare race (lmtrain's side of `scripts/compare_shakespeare.py`) and one Penn Treebank epoch
(lmtrain's side of `scripts/compare_ptb_epoch.py`). For a change that must not move a number.

    git worktree add /tmp/before REV        # and a venv there with that version installed
    python scripts/compare_versions.py --before /tmp/before --before-python /tmp/venv-before/bin/python \\
        --after . --after-python .venv/bin/python --shakespeare PATH/input.txt --ptb PATH/ptb

Each run is `python -m lmtrain train` in the version's own folder, with its own token cache and kernel
build, and the allocator settings of docs/speed.md; evaluation is the whole validation split with the
state carried (as the comparison scripts score it). Prints one JSON line a run and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from comparison import lmtrain_checkout, ptb_folder, text_file, train_result

ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "17179869184",
             "MALLOC_TOP_PAD_": "268435456"}
WHOLE = 10**9
SCORED_ONCE = [f"train.eval_segment={WHOLE}", f"train.eval_every={WHOLE}", f"train.checkpoint_every={WHOLE}",
               "train.final_samples=0"]


def runs(shakespeare: Path, ptb: Path) -> dict[str, list[str]]:
    return {
        "quickstart": ["configs/quickstart.yaml"],
        "68 s race": ["configs/tinyshakespeare-68s.yaml", f"data.path={shakespeare}", "data.corpus=null",
                      "train.max_seconds=68", *SCORED_ONCE],
        "PTB epoch": ["configs/ptb-word.yaml", "data.corpus=null",
                      *(f"data.{split}={ptb}/ptb.{split}.txt" for split in ("train", "valid", "test")), *SCORED_ONCE],
    }


def run(name: str, side: str, folder: Path, python: str, arguments: list[str], out: Path) -> dict:
    env = {**os.environ, **ALLOCATOR, "LMTRAIN_CACHE": str(out / f"cache-{side}"),
           "TORCH_EXTENSIONS_DIR": str(out / f"kernels-{side}")}
    subprocess.run([python, "-m", "lmtrain", "kernels", "build"], cwd=folder, env=env, capture_output=True)
    run_dir = out / f"{name.replace(' ', '-')}-{side}"
    begin = time.perf_counter()
    done = subprocess.run([python, "-m", "lmtrain", "train", *arguments, f"train.out_dir={run_dir}", "--no-progress"],
                          cwd=folder, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - begin
    if done.returncode != 0:
        raise SystemExit(f"{name} ({side}) failed:\n{done.stderr[-2000:]}")
    return {"run": name, "side": side, **train_result(run_dir), "wall_seconds": round(wall)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for side in ("before", "after"):
        parser.add_argument(f"--{side}", type=lmtrain_checkout, required=True, help=f"the {side} version's checkout")
        parser.add_argument(f"--{side}-python", required=True, help="the Python of a venv with it installed")
    parser.add_argument("--shakespeare", type=text_file, required=True, help="Tiny Shakespeare's input.txt")
    parser.add_argument("--ptb", type=ptb_folder, required=True, help="the folder with ptb.{train,valid,test}.txt")
    parser.add_argument("--out", type=Path, default=Path("/tmp/lmtrain-compare-versions"))
    parser.add_argument("--runs", nargs="+", metavar="NAME", help="only these runs (quickstart, race, ptb)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print("allocator:", " ".join(f"{key}={value}" for key, value in ALLOCATOR.items()), flush=True)
    sides = {"before": (args.before.resolve(), args.before_python), "after": (args.after.resolve(), args.after_python)}
    results = []
    chosen = {name: arguments for name, arguments in runs(args.shakespeare.resolve(), args.ptb.resolve()).items()
              if not args.runs or any(word.lower() in name.lower() for word in args.runs)}
    for index, (name, arguments) in enumerate(chosen.items()):
        order = ("before", "after") if index % 2 == 0 else ("after", "before")  # alternate who goes first
        for side in order:
            folder, python = sides[side]
            results.append(run(name, side, folder, python, arguments, args.out))
            print(json.dumps(results[-1]), flush=True)
    print("\n| run | version | steps | training s | tokens/s | valid loss | valid perplexity |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in results:
        print(f"| {row['run']} | {row['side']} | {row['steps']:,} | {row['train_seconds']} | {row['tokens_per_s']:,} | "
              f"{row['valid_loss']:.6f} | {row['valid_ppl']:.4f} |")


if __name__ == "__main__":
    sys.exit(main())
