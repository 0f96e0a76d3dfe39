"""Where a training step's time goes: torch's profiler over 20 steps of a real `lmtrain train` run.

    python scripts/profile_train_step.py PATH/TO/tinyshakespeare/input.txt [override ...]
    python scripts/profile_train_step.py --config configs/ptb-word.yaml PATH/TO/ptb [override ...]

Runs configs/tinyshakespeare-char.yaml (2x256 LSTM, batch 32, bptt 64), or the `--config` given, on the
corpus (a file: `data.path`; a folder: its ptb.{train,valid,test}.txt) for 60 steps in a temporary
folder, profiles steps 31-50, and prints the median step time and the operators by their own CPU time
(per step: divide by 20). docs/benchmarks.md's breakdown of the Tiny Shakespeare step comes from this
script.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from comparison import ROOT, checked_config, corpus, corpus_settings
from torch.profiler import profile

from lmtrain.training.trainer import Trainer

PROFILED = range(30, 50)  # step indices (0-based) inside the profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=ROOT / "configs" / "tinyshakespeare-char.yaml")
    parser.add_argument("corpus", type=corpus, help="a text file, or the folder of ptb.{train,valid,test}.txt")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE for the run")
    args = parser.parse_intermixed_args()  # overrides may come before or after the options
    with tempfile.TemporaryDirectory() as folder:
        config = checked_config(parser, args.config, [
            *corpus_settings(args.corpus), "train.max_steps=60", "train.max_epochs=null", "train.max_seconds=null",
            "train.eval_every=1000", "train.final_samples=0", f"train.out_dir={folder}/run", *args.overrides])
        trainer = Trainer(config, resume=False, echo=print, warn=print, progress_bar=False)
        step, times, profiler = trainer._train_step, [], profile()

        def timed_step(*step_args):
            if len(times) == PROFILED.start:
                profiler.start()
            begin = time.perf_counter()
            result = step(*step_args)
            times.append(time.perf_counter() - begin)
            if len(times) == PROFILED.stop:
                profiler.stop()
            return result

        trainer._train_step = timed_step
        trainer.run()
    print(f"median step {1e3 * statistics.median(times[5:]):.1f} ms, {torch.get_num_threads()} threads; "
          f"profile over {len(PROFILED)} steps:")
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
