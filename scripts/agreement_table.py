"""The lecture's experiment: rnn vs gru vs lstm on subject-verb agreement, same size and budget.

    python scripts/agreement_table.py [--out-dir runs/agreement] [--doc docs/agreement.md] [override ...]

Trains configs/agreement-{rnn,gru,lstm}.yaml (the quickstart's word-level 1x256 model and sentences
mode, 2,000 steps, differing only in `model.cell`), then runs `lmtrain eval agreement` on the bundled
minimal pairs (corpora/agreement/pairs.tsv, none of them in the training split) and writes the
accuracies by distance and by attractors. Overrides (e.g. train.max_steps=500) go to every config.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
from pathlib import Path

import torch
from comparison import ROOT, checked_config, doc_file

from lmtrain.evaluation.agreement import agreement_report
from lmtrain.training.trainer import train

CELLS = ("rnn", "gru", "lstm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="key=value overrides for all three configs")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/agreement"))
    parser.add_argument("--doc", type=doc_file, default=ROOT / "docs" / "agreement.md")
    args = parser.parse_intermixed_args()  # overrides may come before or after the options
    configs = {cell: checked_config(parser, ROOT / "configs" / f"agreement-{cell}.yaml",
                                    [f"train.out_dir={args.out_dir / cell}", *args.overrides]) for cell in CELLS}
    reports, losses = {}, {}
    for cell, config in configs.items():
        out_dir = args.out_dir / cell
        losses[cell] = train(config, echo=print, progress_bar=False).progress.best_valid_loss
        reports[cell] = agreement_report(str(out_dir / "best.pt"))
    cell_text = lambda value: "-" if value[0] is None else f"{value[0]:.3f}"  # noqa: E731
    lines = ["| | " + " | ".join(CELLS) + " | pairs |", "|---|" + "---:|" * (len(CELLS) + 1),
             "| **all** | " + " | ".join(f"**{reports[c]['accuracy']:.3f}**" for c in CELLS)
             + f" | {reports[CELLS[0]]['count']} |"]
    for title, key in (("words between", "by_distance"), ("attractors", "by_attractors")):
        for bucket, (_, count) in reports[CELLS[0]][key].items():
            lines.append(f"| {title} {bucket} | " + " | ".join(cell_text(reports[c][key][bucket]) for c in CELLS)
                         + f" | {count} |")
    lines.append("| valid loss (nats/word) | " + " | ".join(f"{losses[c]:.4f}" for c in CELLS) + " | |")
    command = shlex.join(["python", "scripts/agreement_table.py", *sys.argv[1:]])
    header = [f"`{command}` ({platform.machine()}, torch {torch.__version__}): "
              f"configs/agreement-CELL.yaml for each cell ({config.train.max_steps} steps, model.gradients "
              f"{config.model.gradients}), then `lmtrain eval agreement --checkpoint {args.out_dir}/CELL/best.pt`. "
              f"Accuracy = share of minimal pairs whose correct sentence the model finds more probable.", ""]
    text = "\n".join(header + lines) + "\n"
    print(text)
    args.doc.write_text("# Subject-verb agreement: rnn vs gru vs lstm\n\n" + text, encoding="utf-8")


if __name__ == "__main__":
    main()
