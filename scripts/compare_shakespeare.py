"""lmtrain against the reference `nn.LSTM` model on Tiny Shakespeare, at the same training time, in one job.

    python scripts/compare_shakespeare.py PATH/TO/tinyshakespeare/input.txt [--seconds 68] [--repeats 1]
        [--config configs/tinyshakespeare-68s.yaml] [--variant "KEY=VALUE ..."]...

Runs `scripts/reference_nn_lstm.py --seconds S --eval` and `lmtrain train CONFIG train.max_seconds=S` (once
per `--variant`, each a space-separated list of overrides; once as the config stands without one), one
after the other (alternating when --repeats > 1), each in a fresh process with this process's environment.
Both budgets count training steps only, not start-up or evaluation. Both are scored the same way: the
whole validation split (the last 10% of the file, cut at a line end) with the state carried throughout,
in nats per character (lmtrain's `train.eval_segment` is set past the split's length for this; its
default restarts the state every 2,048 characters). Prints a Markdown table for docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from comparison import (
    ROOT,
    checked_config,
    corpus_settings,
    lmtrain_settings,
    machine_line,
    positive_integer,
    positive_number,
    print_table,
    run_lmtrain,
    run_subprocess,
    text_file,
)


def run_reference(corpus: Path, seconds: float) -> dict:
    output, wall = run_subprocess([sys.executable, str(ROOT / "scripts" / "reference_nn_lstm.py"), str(corpus),
                                   "--seconds", str(seconds), "--eval"])
    result = json.loads(output.strip().splitlines()[-1])
    return {"name": "reference `scripts/reference_nn_lstm.py`", "steps": result["steps"],
            "train_seconds": round(result["train_seconds"], 1), "tokens_per_s": round(result["tokens_per_s"]),
            "valid_loss": result["valid_loss"], "wall_seconds": round(wall)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=text_file, help="Tiny Shakespeare's input.txt")
    parser.add_argument("--seconds", type=positive_number, default=68.0, help="training time of each (steps only)")
    parser.add_argument("--repeats", type=positive_integer, default=1)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "tinyshakespeare-68s.yaml")
    parser.add_argument("--variant", action="append", default=None,
                        help="overrides for one lmtrain run, e.g. \"train.lr=0.003 train.batch_size=64\"")
    args = parser.parse_args()
    corpus, config = args.corpus.resolve(), args.config.resolve()  # the runs start in the repository root
    settings = [*corpus_settings(corpus), f"train.max_seconds={args.seconds}"]
    for variant in args.variant or [""]:
        checked_config(parser, config, [*lmtrain_settings(settings, Path("run")), *variant.split()])
    print(machine_line(), flush=True)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            results.append(run_reference(corpus, args.seconds))
            print(json.dumps(results[-1]), flush=True)
            for index, variant in enumerate(args.variant or [""]):
                out_dir = Path(folder) / f"lmtrain-{repeat}-{index}"
                results.append(run_lmtrain(config, settings, variant.split(), out_dir))
                print(json.dumps(results[-1]), flush=True)
    print_table(results, f"Tiny Shakespeare, {args.seconds:g} s of training")


if __name__ == "__main__":
    main()
