"""Measure the vanishing gradient of the lecture for rnn, gru and lstm and write docs/gradients.md.

    python scripts/gradient_decay.py [--steps 1000] [--out-dir runs/gradient-decay] [--doc docs/gradients.md]

Trains one model per cell on the bundled agreement corpus (word level, stream mode, 1x256, the same
steps and settings for each), then runs `lmtrain diagnose gradients` on each trained checkpoint and on
each untrained model, and writes the table with the commands that produced it.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from comparison import ROOT, doc_file, integer_at_least, positive_integer

from lmtrain.config import load_config
from lmtrain.evaluation.diagnose import distances_to_show, gradient_report
from lmtrain.training.trainer import train

CELLS = ("rnn", "gru", "lstm")


def overrides(cell: str, steps: int, out_dir: Path) -> list[str]:
    # model.gradients=autograd: the setting docs/gradients.md was measured with (the default then).
    return [f"model.cell={cell}", "model.gradients=autograd", "data.mode=stream", "model.embed_size=128",
            "model.hidden_size=256", f"train.max_steps={steps}", f"train.eval_every={steps}",
            f"train.checkpoint_every={steps}", "train.warmup_steps=0", "train.schedule=constant",
            "train.final_samples=0", f"train.out_dir={out_dir / cell}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive_integer, default=1000)
    parser.add_argument("--length", type=integer_at_least(2, "a loss and one step before it"), default=64)
    parser.add_argument("--out-dir", type=Path, default=Path("runs/gradient-decay"))
    parser.add_argument("--doc", type=doc_file, default=ROOT / "docs" / "gradients.md")
    args = parser.parse_args()
    config_path = ROOT / "configs" / "quickstart.yaml"
    trained, untrained, losses, seconds = {}, {}, {}, {}
    for cell in CELLS:
        cell_overrides = overrides(cell, args.steps, args.out_dir)
        _, untrained[cell] = gradient_report(config_path=str(config_path), overrides=cell_overrides, length=args.length)
        begin = time.perf_counter()
        result = train(load_config(config_path, cell_overrides), echo=print, progress_bar=False)
        seconds[cell], losses[cell] = time.perf_counter() - begin, result.progress.best_valid_loss
        _, trained[cell] = gradient_report(checkpoint=str(args.out_dir / cell / "best.pt"), length=args.length)
    distances = distances_to_show(args.length)
    lines = [
        "# The vanishing gradient, measured",
        "",
        "The lecture: \"RNN is not good at learning this long term dependent relationship ... As we go deeper,",
        "vanishing gradient. To combat these two issues we have GRU and LSTM.\" `lmtrain diagnose gradients`",
        "measures it: for the loss L(T) at the last step of a window, the norm of ∂L(T)/∂a(t) of the top layer",
        "against the distance T - t, relative to distance 0 (mean over 32 windows of the validation split).",
        "",
        f"Made by `python scripts/gradient_decay.py --steps {args.steps} --length {args.length}` on "
        f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads: each cell trained "
        f"{args.steps} steps on the",
        "bundled agreement corpus (word level, stream mode, batch 32, bptt 64, 1x256, Adam 3e-3, clip 5,",
        "`model.gradients=autograd`), then",
        "`lmtrain diagnose gradients --checkpoint runs/gradient-decay/CELL/best.pt` and, untrained,",
        "`lmtrain diagnose gradients --config configs/quickstart.yaml model.cell=CELL ...`.",
        "",
        "| T - t | " + " | ".join(f"{c} untrained" for c in CELLS) + " | "
        + " | ".join(f"{c} trained" for c in CELLS) + " |",
        "|---:|" + "---:|" * (2 * len(CELLS)),
    ]
    for index, distance in enumerate(distances):
        cells = ([f"{untrained[c][index]['relative']:.1e}" for c in CELLS]
                 + [f"{trained[c][index]['relative']:.1e}" for c in CELLS])
        lines.append(f"| {distance} | " + " | ".join(cells) + " |")
    lines += ["", "| cell | validation loss after training (nats/word) | training wall time |", "|---|---:|---:|"]
    lines += [f"| {c} | {losses[c]:.4f} | {seconds[c]:.0f} s |" for c in CELLS]
    args.doc.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
