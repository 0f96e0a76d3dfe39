"""The lecture's experiment: rnn vs gru vs lstm on subject-verb agreement, same size and budget.

    python scripts/agreement_table.py [--steps 2000] [--out-dir runs/agreement] [--doc docs/agreement.md]

Trains the quickstart config (word level, sentences mode, 1x256) once per cell for `--steps` steps,
then runs `lmtrain eval agreement` on the bundled minimal pairs (corpora/agreement/pairs.tsv, none of
them in the training split) and writes the accuracies by distance and by attractors.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from lmtrain.agreement import agreement_report
from lmtrain.config import load_config
from lmtrain.train import train

ROOT = Path(__file__).resolve().parent.parent
CELLS = ("rnn", "gru", "lstm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out-dir", type=Path, default=Path("runs/agreement"))
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "agreement.md")
    args = parser.parse_args()
    reports, losses = {}, {}
    for cell in CELLS:
        out_dir = args.out_dir / cell
        config = load_config(ROOT / "configs" / "quickstart.yaml",
                             # autograd: the setting docs/agreement.md was measured with (the default then)
                             [f"model.cell={cell}", "model.backward=autograd", f"train.max_steps={args.steps}", f"train.out_dir={out_dir}",
                              "train.final_samples=0"])
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
    header = [f"`python scripts/agreement_table.py --steps {args.steps}` ({platform.machine()}, torch {torch.__version__}): "
              f"the quickstart config with `model.cell` set to each cell (and `model.backward=autograd`), "
              f"{args.steps} steps each, then "
              f"`lmtrain eval agreement --checkpoint runs/agreement/CELL/best.pt`. Accuracy = share of minimal pairs "
              f"whose correct sentence the model finds more probable.", ""]
    text = "\n".join(header + lines) + "\n"
    print(text)
    args.doc.write_text("# Subject-verb agreement: rnn vs gru vs lstm\n\n" + text, encoding="utf-8")


if __name__ == "__main__":
    main()
