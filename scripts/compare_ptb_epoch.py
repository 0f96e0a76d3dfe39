"""One epoch of Penn Treebank with pytorch/examples' word_language_model setting (2x200 LSTM, bptt 35,
batch 20, SGD lr 20, clip 0.25, no dropout): the example (scripts/reference_word_lm.py) against lmtrain
(configs/ptb-word.yaml), one after the other in one job.

    python scripts/compare_ptb_epoch.py PATH/TO/ptb [--repeats 1] [override ...]

PATH/TO/ptb holds ptb.{train,valid,test}.txt. Tokens/s count training steps only. Both score the whole
validation split with the state carried (the example as 10 streams; lmtrain as one, `train.eval_segment`
set past the split's length). Prints a Markdown table for docs/results.md.
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
    machine_line,
    positive_integer,
    print_table,
    ptb_folder,
    run_lmtrain,
    run_subprocess,
)

CONFIG = ROOT / "configs" / "ptb-word.yaml"


def run_reference(folder: Path) -> dict:
    output, wall = run_subprocess([sys.executable, str(ROOT / "scripts" / "reference_word_lm.py"), str(folder)])
    result = json.loads(output.strip().splitlines()[-1])
    return {"name": "pytorch/examples word_language_model `scripts/reference_word_lm.py`",
            "steps": result["steps"], "train_seconds": result["train_seconds"],
            "tokens_per_s": result["tokens_per_s"], "valid_loss": result["valid_loss"], "wall_seconds": round(wall)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=ptb_folder)
    parser.add_argument("--repeats", type=positive_integer, default=1)
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE for the lmtrain run")
    args = parser.parse_intermixed_args()  # overrides may come before or after the options
    folder = args.folder.resolve()
    settings = corpus_settings(folder)
    checked_config(parser, CONFIG, [*settings, *args.overrides])
    print(machine_line(), flush=True)
    results = []
    with tempfile.TemporaryDirectory() as out:
        for repeat in range(args.repeats):
            for result in (run_reference(folder),
                           run_lmtrain(CONFIG, settings, args.overrides, Path(out) / f"lmtrain-{repeat}")):
                results.append(result)
                print(json.dumps(result), flush=True)
    print_table(results, "Penn Treebank, one epoch, 2x200 LSTM", perplexity=True)


if __name__ == "__main__":
    main()
