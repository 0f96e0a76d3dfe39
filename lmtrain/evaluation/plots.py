"""Learning curves from runs' `metrics.jsonl`, drawn with matplotlib (an optional extra:
`pip install -e ".[plot]"` in lmtrain's folder)."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

from lmtrain.errors import LmtrainError, os_reason
from lmtrain.files import check_output, metric_events, printable_name, writing_output

FIGURE_SUFFIXES = (".png", ".svg", ".pdf")
# A plotted value outside this range is no step, loss or time a run writes (a hand-edited or damaged
# file): drawn, such values overflow matplotlib's axis arithmetic.
PLAUSIBLE = (0.0, 1e15)


def pyplot() -> Any:
    """matplotlib's pyplot on a file-only backend, or a clear error when matplotlib is missing."""
    # Its import logs warnings of its own (a home folder it cannot write, a first font cache): not a user's concern.
    logger = logging.getLogger("matplotlib")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        raise LmtrainError("plotting needs matplotlib: pip install matplotlib (or, in lmtrain's folder, "
                           "pip install -e '.[plot]')") from None
    finally:
        logger.setLevel(level)
    return plt


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The events of a run folder's metrics.jsonl. A line that is not one (`files.metric_events`: not UTF-8,
    not a JSON object, a step that is not a number) is skipped, and one warning names the file and the
    count; a last line cut short by a crash, silently."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise LmtrainError(f"no metrics.jsonl in {run_dir} (is it a train.out_dir?)")
    if not path.is_file():  # a device (a link to /dev/zero) would be read until memory runs out
        raise LmtrainError(f"{path} is not a regular file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise LmtrainError(f"cannot read {path}: {os_reason(error)}") from None
    records, skipped = metric_events(data)
    events = [values for _, values in records]
    if skipped:  # a warning, not a print: the CLI shows it as one `warning:` line, a script can filter it
        warnings.warn(f"{path}: {skipped} damaged line{'s' if skipped > 1 else ''} (not UTF-8 or not a "
                      f"JSON event) skipped", stacklevel=2)
    return events


def _number(value: Any) -> float:
    """A field to plot: a missing or null one (a loss that diverged, a window of skipped steps), or one
    outside `PLAUSIBLE`, is NaN, which matplotlib leaves as a gap in the line."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value) if PLAUSIBLE[0] <= value <= PLAUSIBLE[1] else math.nan


def plot_runs(run_dirs: list[str], output: str, *, option: str = "output") -> None:
    """Train and validation loss against step (left) and against wall-clock time (right), one colour
    per run, validation dashed (a bi model's right-to-left LM dotted), written to `output` (.png, .svg
    or .pdf; `option` names it in an error)."""
    check_output(option, output, suffixes=FIGURE_SUFFIXES,
                 inputs=[Path(run_dir) / "metrics.jsonl" for run_dir in run_dirs])
    run_dirs = first_of_each_folder(run_dirs)
    runs = {run_dir: read_metrics(run_dir) for run_dir in run_dirs}
    names = legend_names(run_dirs)
    empty = [str(run_dir) for run_dir, events in runs.items() if not any(event.get("split") in ("train", "valid")
                                                                        for event in events)]
    if empty:  # an empty figure, and matplotlib's own warning about its legend, would say less
        raise LmtrainError(f"no train or valid events to plot in {', '.join(empty)}/metrics.jsonl")
    plt = pyplot()
    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for index, (run_dir, events) in enumerate(runs.items()):
        colour, name = f"C{index}", names[index]
        for split, style in (("train", "-"), ("valid", "--o"), ("valid_right_to_left", ":s")):  # the last: bi models
            chosen = [event for event in events if event.get("split") == split]
            if not chosen:
                continue
            losses = [_number(event.get("loss")) for event in chosen]
            label = f"{name} {split}"
            by_step.plot([_number(event.get("step")) for event in chosen], losses, style, color=colour, label=label,
                         markersize=3)
            by_time.plot([_number(event.get("elapsed_s")) for event in chosen], losses, style, color=colour,
                         label=label, markersize=3)
    by_step.set(xlabel="step", ylabel="loss (nats/token)")
    by_time.set(xlabel="wall-clock seconds")
    by_step.legend(fontsize="small")
    figure.tight_layout()
    save_figure(plt, figure, output)


def first_of_each_folder(run_dirs: list[str]) -> list[str]:
    """`run_dirs` in their order, a folder given twice (under any path) kept where it first appears."""
    seen, kept = set(), []
    for run_dir in run_dirs:
        if (folder := Path(run_dir).resolve()) not in seen:
            seen.add(folder)
            kept.append(run_dir)
    return kept


def legend_names(run_dirs: list[str]) -> list[str]:
    """Each run by its folder's name, or by the path given where two folders share a name."""
    names = [printable_name(run_dir) for run_dir in run_dirs]
    return [name if names.count(name) == 1 else printable_name(run_dir, whole=True)
            for name, run_dir in zip(names, run_dirs)]


def save_figure(plt: Any, figure: Any, path: str, **options: Any) -> None:
    """Write the figure whole or not at all (an existing file stays as it was if the write fails or the
    process is killed), in the format its name ends with, and free it."""
    try:
        with writing_output(path) as handle:
            figure.savefig(handle, format=Path(path).suffix[1:].lower(), **options)
    except OSError as error:
        raise LmtrainError(f"cannot write {path}: {os_reason(error)}") from None
    except ValueError as error:  # a format this matplotlib cannot write
        raise LmtrainError(f"cannot write {path}: {error}") from None
    finally:
        plt.close(figure)
