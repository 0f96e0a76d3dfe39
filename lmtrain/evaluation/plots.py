"""Learning curves from runs' `metrics.jsonl`, drawn with matplotlib (an optional extra:
`pip install "lmtrain[plot]"`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmtrain.errors import LmtrainError


def pyplot() -> Any:
    """matplotlib's pyplot on a file-only backend, or a clear error when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        raise LmtrainError("plotting needs matplotlib: pip install 'lmtrain[plot]' (or pip install matplotlib)"
                           ) from None
    return plt


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The events of a run folder's metrics.jsonl (a line cut short by a crash is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise LmtrainError(f"no metrics.jsonl in {run_dir} (is it a train.out_dir?)")
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def plot_runs(run_dirs: list[str], output: str) -> None:
    """Train and validation loss against step (left) and against wall-clock time (right), one
    colour per run, validation dashed."""
    plt = pyplot()
    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for index, run_dir in enumerate(run_dirs):
        events, colour, name = read_metrics(run_dir), f"C{index}", Path(run_dir).name or str(run_dir)
        for split, style in (("train", "-"), ("valid", "--o")):
            chosen = [event for event in events if event.get("split") == split]
            if not chosen:
                continue
            losses = [event["loss"] for event in chosen]
            label = f"{name} {split}"
            by_step.plot([event["step"] for event in chosen], losses, style, color=colour, label=label, markersize=3)
            by_time.plot([event["elapsed_s"] for event in chosen], losses, style, color=colour, label=label,
                         markersize=3)
    by_step.set(xlabel="step", ylabel="loss (nats/token)")
    by_time.set(xlabel="wall-clock seconds")
    by_step.legend(fontsize="small")
    save_figure(plt, figure, output)


def save_figure(plt: Any, figure: Any, path: str) -> None:
    """Write the figure (format from the file name) and free it; a bad path is one line of error."""
    figure.tight_layout()
    try:
        figure.savefig(path)
    except (OSError, ValueError) as error:
        raise LmtrainError(f"cannot write the plot {path}: {error}") from None
    finally:
        plt.close(figure)
