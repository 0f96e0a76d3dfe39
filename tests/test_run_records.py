"""What a run records must be true: metrics.jsonl with a damaged line is still read (by `--resume` and by
`lmtrain plot`) with one warning; a run that stops on non-finite numbers names only the checkpoints that
exist; a logging window of skipped steps is never logged as a perfect loss. Tiny runs, mostly in-process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from corpus_helpers import train_and_valid

import lmtrain.speed.loss as loss_module
from lmtrain.config import build_config
from lmtrain.errors import LmtrainError
from lmtrain.evaluation.plots import plot_runs, read_metrics
from lmtrain.training.metrics import event, progress_line
from lmtrain.training.trainer import train

DAMAGED = b"\xff\xfe not UTF-8\n" + b"not JSON either\n"  # two lines: undecodable, then garbage
NOT_EVENTS = b'{"step": "7", "split": "train", "loss": 1.0}\n{"step": 4, "split": "train", "loss": "low"}\n'  # JSON
SCRIPT = Path(sys.executable).with_name("lmtrain")
LMTRAIN = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "lmtrain"]


@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, Path]:
    return train_and_valid(tmp_path)


def values(corpus, out_dir: Path, **overrides) -> dict:
    base = {"data.train": str(corpus["train"]), "data.valid": str(corpus["valid"]), "model.embed_size": 16,
            "model.hidden_size": 16, "model.num_layers": 1, "train.batch_size": 4, "train.bptt": 8,
            "train.eval_every": 1000, "train.checkpoint_every": 2, "train.log_every": 1, "train.final_samples": 0,
            "train.device": "cpu", "train.out_dir": str(out_dir), "train.max_steps": 6}
    base.update({key.replace("__", "."): value for key, value in overrides.items()})
    return base


def config(corpus, out_dir: Path, **overrides):
    return build_config(values(corpus, out_dir, **overrides))


def strict_events(out_dir: Path) -> list[dict]:
    return [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl: not JSON"))
            for line in (out_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def poison_training_steps(monkeypatch, *, bad: set[int]) -> None:
    """The training losses of the steps in `bad` (counted from 1 in this process) become NaN."""
    real, calls = loss_module.projected_nll, {"n": 0}

    def poisoned(*args, **kwargs):
        total = real(*args, **kwargs)
        if not torch.is_grad_enabled():  # evaluation
            return total
        calls["n"] += 1
        return total * float("nan") if calls["n"] in bad else total

    monkeypatch.setattr(loss_module, "projected_nll", poisoned)


def lmtrain(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    return subprocess.run([*LMTRAIN, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


# -- a damaged metrics.jsonl -------------------------------------------------------------------------

def test_resume_removes_damaged_metrics_lines_with_one_warning(tmp_path, corpus):
    out_dir = tmp_path / "run"
    train(config(corpus, out_dir), progress_bar=False)
    good = (out_dir / "metrics.jsonl").read_bytes()
    resumed_from = (out_dir / "step-0000006.pt").read_bytes()
    (out_dir / "metrics.jsonl").write_bytes(good + DAMAGED + NOT_EVENTS)
    messages: list[str] = []
    result = train(config(corpus, out_dir, train__max_steps=8), resume=True, warn=messages.append,
                   progress_bar=False)
    assert result.progress.step == 8
    warned = [m for m in messages if "metrics.jsonl" in m]
    assert len(warned) == 1 and "4 damaged lines" in warned[0] and str(out_dir) in warned[0], messages
    after = (out_dir / "metrics.jsonl").read_bytes()
    assert after.startswith(good)  # every good record kept, byte for byte
    assert [e["step"] for e in strict_events(out_dir) if e["split"] == "train"] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert (out_dir / "step-0000006.pt").read_bytes() == resumed_from


def test_read_metrics_skips_damaged_lines_with_one_warning(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    events = [{"step": s, "split": "train", "loss": 3.0 / s, "elapsed_s": 0.1 * s} for s in (1, 2, 3)]
    lines = [json.dumps(e).encode() + b"\n" for e in events]
    (run / "metrics.jsonl").write_bytes(lines[0] + DAMAGED + b"[1, 2]\n" + NOT_EVENTS + b"".join(lines[1:]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_metrics(run) == events
    assert [str(w.message) for w in caught] == [
        f"{run / 'metrics.jsonl'}: 5 damaged lines (not UTF-8 or not a JSON event) skipped"]


def test_a_last_line_cut_short_by_a_crash_is_dropped_without_a_warning(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    events = [{"step": s, "split": "train", "loss": 3.0 / s} for s in (1, 2)]
    (run / "metrics.jsonl").write_bytes(b"".join(json.dumps(e).encode() + b"\n" for e in events) + b'{"step": 3, "sp')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_metrics(run) == events


@pytest.mark.slow
def test_the_commands_read_a_metrics_file_with_a_byte_that_is_not_utf8(tmp_path, corpus):
    """`lmtrain train --resume` and `lmtrain plot`: one warning line, no internal error, checkpoints intact."""
    pytest.importorskip("matplotlib")
    out_dir = tmp_path / "run"
    config_file = tmp_path / "tiny.yaml"
    tree: dict = {}
    for key, value in values(corpus, out_dir).items():
        section, _, name = key.partition(".")
        tree.setdefault(section, {})[name] = value
    config_file.write_text(yaml.safe_dump(tree))
    assert lmtrain("train", config_file, "--no-progress", cwd=tmp_path).returncode == 0
    with open(out_dir / "metrics.jsonl", "ab") as handle:
        handle.write(b"\xff\xfe\n")
    checkpoints = {path.name: path.read_bytes() for path in out_dir.glob("*.pt")}

    plotted = lmtrain("plot", out_dir, "-o", tmp_path / "curves.png", cwd=tmp_path)
    assert plotted.returncode == 0, plotted.stderr
    assert plotted.stderr.splitlines() == [
        f"warning: {out_dir / 'metrics.jsonl'}: 1 damaged line (not UTF-8 or not a JSON event) skipped"]

    resumed = lmtrain("train", config_file, "--no-progress", "--resume", "train.max_steps=8", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "internal error" not in resumed.stderr
    assert [line for line in resumed.stderr.splitlines() if line.startswith("warning:")] == [
        f"warning: {out_dir / 'metrics.jsonl'}: 1 damaged line (not UTF-8 or not a JSON event) removed, "
        f"the events around it kept"]
    assert (out_dir / "step-0000006.pt").read_bytes() == checkpoints["step-0000006.pt"]


# -- the checkpoints a stopped run names ---------------------------------------------------------------

@pytest.mark.parametrize("checkpoint_every", [1000, 1], ids=["max_bad_steps", "weights_not_finite"])
def test_a_run_stopped_before_any_checkpoint_says_none_was_written(tmp_path, corpus, checkpoint_every):
    """lr 1e300: the first step blows the weights up, and every step after it is non-finite."""
    out_dir = tmp_path / "run"
    with pytest.raises(LmtrainError) as stopped:
        train(config(corpus, out_dir, train__lr=1e300, train__checkpoint_every=checkpoint_every,
                     train__max_steps=20), progress_bar=False)
    message = str(stopped.value)
    assert not list(out_dir.glob("*.pt"))
    assert f"no checkpoint was written before it, so {out_dir} holds none to resume from" in message, message
    assert "kept as" not in message


def test_a_run_stopped_with_only_best_pt_names_best_pt(tmp_path, corpus, monkeypatch):
    poison_training_steps(monkeypatch, bad={3, 4, 5})
    out_dir = tmp_path / "run"
    with pytest.raises(LmtrainError, match=r"3 steps in a row") as stopped:
        train(config(corpus, out_dir, train__checkpoint_every=1000, train__eval_every=1, train__max_bad_steps=3,
                     train__max_steps=20), progress_bar=False)
    assert sorted(path.name for path in out_dir.glob("*.pt")) == ["best.pt"]
    assert f"no last.pt was written before it; best.pt in {out_dir} is kept as it was" in str(stopped.value)


def test_a_run_stopped_after_a_checkpoint_names_last_pt(tmp_path, corpus, monkeypatch):
    poison_training_steps(monkeypatch, bad={3, 4, 5})
    out_dir = tmp_path / "run"
    with pytest.raises(LmtrainError, match=r"3 steps in a row") as stopped:
        train(config(corpus, out_dir, train__max_bad_steps=3, train__max_steps=20), progress_bar=False)
    assert (out_dir / "last.pt").exists()
    assert f"the last good checkpoint {out_dir / 'last.pt'} is kept as it was" in str(stopped.value)


# -- skipped steps in metrics.jsonl ----------------------------------------------------------------------

def test_a_window_of_skipped_steps_logs_no_loss(tmp_path, corpus):
    out_dir = tmp_path / "run"
    with pytest.raises(LmtrainError, match=r"steps in a row"):
        train(config(corpus, out_dir, train__lr=1e300, train__max_steps=20), progress_bar=False)
    logged = [e for e in strict_events(out_dir) if e["split"] == "train"]
    assert logged[0]["step"] == 1 and logged[0]["loss"] > 0 and "skipped" not in logged[0]
    assert len(logged) > 1
    for skipped in logged[1:]:
        assert skipped["loss"] is None and skipped["ppl"] is None and skipped["skipped"] == 1, skipped


def test_a_partly_skipped_window_logs_the_mean_of_its_good_steps(tmp_path, corpus, monkeypatch):
    straight = tmp_path / "straight"
    train(config(corpus, straight, train__log_every=1), progress_bar=False)
    poison_training_steps(monkeypatch, bad={3})
    out_dir = tmp_path / "run"
    train(config(corpus, out_dir, train__log_every=2, train__checkpoint_every=1000), progress_bar=False)
    # The weights at step 4 are those of step 3 in the straight run (step 3 made no update), so only steps
    # 1 and 2 are comparable; the window of steps 3-4 holds one good step and says that one was skipped.
    one_by_one = {e["step"]: e["loss"] for e in strict_events(straight) if e["split"] == "train"}
    windows = {e["step"]: e for e in strict_events(out_dir) if e["split"] == "train"}
    assert "skipped" not in windows[2] and windows[2]["loss"] == pytest.approx(
        (one_by_one[1] + one_by_one[2]) / 2, rel=0.05)
    assert windows[4]["skipped"] == 1 and math.isfinite(windows[4]["loss"]) and windows[4]["loss"] > 1.0
    assert windows[4]["ppl"] == pytest.approx(math.exp(windows[4]["loss"]), rel=1e-4)


def test_an_event_of_skipped_steps_is_strict_json_without_a_loss():
    record = event(step=7, split="train", loss=None, lr=1e-3, tokens_per_s=0.0, elapsed_seconds=1.0, threads=1,
                   skipped=3)
    assert record["loss"] is None and record["ppl"] is None and record["skipped"] == 3
    json.dumps(record, allow_nan=False)
    assert "skipped" not in event(step=1, split="train", loss=2.0, lr=1e-3, tokens_per_s=1.0, elapsed_seconds=1.0,
                                  threads=1)
    line = progress_line(step=7, total_steps=10, loss=None, lr=1e-3, tokens_per_s=0.0, elapsed_seconds=1, left=None,
                         skipped=3)
    assert line.startswith("step 7/10: no loss (3 steps skipped), lr 1.00e-03")


def test_plot_draws_a_run_with_skipped_windows(tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    records = [event(step=1, split="train", loss=2.5, lr=1e-3, tokens_per_s=1.0, elapsed_seconds=0.1, threads=1),
               event(step=2, split="train", loss=None, lr=1e-3, tokens_per_s=0.0, elapsed_seconds=0.2, threads=1,
                     skipped=1),
               event(step=2, split="valid", loss=float("nan"), lr=1e-3, tokens_per_s=1.0, elapsed_seconds=0.2,
                     threads=1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in records))
    plot_runs([str(run)], str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_whose_outputs_overflow_still_finishes_without_samples(tmp_path, corpus, monkeypatch):
    """The final samples of a model whose weights are finite but whose outputs are not: a warning, not an
    error after a run that trained and saved its checkpoints."""
    import lmtrain.training.trainer as trainer_module
    from lmtrain.evaluation.sampling import NonFiniteOutputs

    def overflowing(*args, **kwargs):
        raise NonFiniteOutputs("the model's outputs are not finite numbers")

    monkeypatch.setattr(trainer_module, "generate", overflowing)
    messages: list[str] = []
    result = train(config(corpus, tmp_path / "run", train__final_samples=2), warn=messages.append, progress_bar=False)
    assert result.samples == [] and (tmp_path / "run" / "last.pt").is_file()
    assert [m for m in messages if "no samples" in m] == [
        "warning: no samples at step 6: the model's outputs are not finite numbers (its weights diverged; a lower "
        "train.lr or train.clip may help)"]
