"""Page faults and time of a PTB training step, with glibc's default allocator settings and with the
freed memory kept (lmtrain/speed/memory.py), each in a fresh process.

    python scripts/page_faults.py PATH/TO/ptb [--steps 80]

Runs configs/ptb-word.yaml (2x200 LSTM, 20 x 35 words a step, a 10,000-word softmax) for `--steps` steps
in a temporary folder, and prints the median step time and the median minor page faults a step over
the steps after the tenth: once with LMTRAIN_KEEP_FREED_MEMORY=0 (glibc's defaults), once without.
Any MALLOC_* variable set here is removed for both runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from comparison import ROOT, integer_at_least, ptb_folder, run_child

SKIPPED = 10  # the first steps, which allocate what the later ones reuse


def measure(folder: Path, steps: int) -> dict:
    """In this process: train `steps` steps and time each, counting minor page faults."""
    from lmtrain.config import load_config
    from lmtrain.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as out:
        config = load_config(ROOT / "configs" / "ptb-word.yaml", [
            "data.corpus=null", *(f"data.{split}={folder / f'ptb.{split}.txt'}" for split in ("train", "valid")),
            f"train.max_steps={steps}", "train.max_epochs=null", "train.eval_every=100000",
            "train.final_samples=0", f"train.out_dir={out}/run"])
        trainer = Trainer(config, resume=False, echo=lambda line: None, warn=print, progress_bar=False)
        step, records = trainer._train_step, []

        def counted(*args):
            faults, begin = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            result = step(*args)
            records.append((time.perf_counter() - begin, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))
            return result

        trainer._train_step = counted
        trainer.run()
    later = records[SKIPPED:]
    return {"median_step_ms": round(1e3 * statistics.median(t for t, _ in later), 1),
            "median_faults_per_step": statistics.median(f for _, f in later)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=ptb_folder)
    parser.add_argument("--steps", type=integer_at_least(SKIPPED + 1, f"the first {SKIPPED} are not counted"),
                        default=80)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.folder.resolve(), args.steps)))
        return
    base = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    for label, extra in (("glibc defaults (LMTRAIN_KEEP_FREED_MEMORY=0)", {"LMTRAIN_KEEP_FREED_MEMORY": "0"}),
                         ("freed memory kept (lmtrain's default)", {})):
        env = {**{k: v for k, v in base.items() if k != "LMTRAIN_KEEP_FREED_MEMORY"}, **extra}
        output = run_child([sys.executable, __file__, str(args.folder), "--steps", str(args.steps), "--measure"],
                           env=env).stdout
        print(f"{label}: {output.strip().splitlines()[-1]}", flush=True)


if __name__ == "__main__":
    main()
