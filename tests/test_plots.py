"""lmtrain.evaluation.plots: reading metrics.jsonl and the learning-curve plot (the drawing itself only where the
optional matplotlib is installed)."""

from __future__ import annotations

import json

import pytest

from lmtrain.errors import LmtrainError
from lmtrain.evaluation.plots import plot_runs, read_metrics


def write_run(folder, events, tail=""):
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + tail)
    return folder


EVENTS = [{"step": s, "split": split, "loss": 3.0 / s, "elapsed_s": 0.1 * s} for s in (1, 2, 3)
          for split in ("train", "valid")]


def test_read_metrics_skips_a_line_cut_short(tmp_path):
    run = write_run(tmp_path / "run", EVENTS, tail='{"step": 4, "spl')
    assert read_metrics(run) == EVENTS


def test_missing_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(LmtrainError, match="no metrics.jsonl"):
        read_metrics(tmp_path)


def test_without_matplotlib_a_clear_error(tmp_path, no_matplotlib):
    with pytest.raises(LmtrainError, match="matplotlib"):
        plot_runs([str(write_run(tmp_path / "run", EVENTS))], str(tmp_path / "curves.png"))


def test_plot_writes_an_image(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [str(write_run(tmp_path / name, EVENTS)) for name in ("a", "b")]
    plot_runs(runs, str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
