"""The training loop through the Python API: exact resume, the three stopping limits, best.pt, the
evaluation and checkpoint cadence, learning, the saved config, the LR schedule and the checkpoint
payload. Tiny corpora written to tmp_path, tiny models, a few dozen steps each."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from corpus_helpers import sentences, write_lines

from lmtrain.checkpoint import FORMAT_VERSION
from lmtrain.config import Config, build_config, load_config
from lmtrain.errors import LmtrainError
from lmtrain.evaluation.perplexity import evaluate_checkpoint
from lmtrain.training.rundir import RunDirectory
from lmtrain.training.trainer import train

BATCH_SIZE, BPTT = 4, 16


# -- shared helpers ---------------------------------------------------------------------------------

@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, Path]:
    """40 training and 10 validation lines (every line shorter than 64 characters)."""
    lines = sentences(50, seed=7)
    return {"train": write_lines(tmp_path / "train.txt", lines[:40]),
            "valid": write_lines(tmp_path / "valid.txt", lines[40:])}


def make_config(corpus: dict[str, Path], out_dir: Path, **values) -> Config:
    """A tiny char-level config over `corpus`; `values` are dotted keys with '.' written as '__'."""
    base = {"data.train": str(corpus["train"]), "data.valid": str(corpus["valid"]), "data.level": "char",
            "data.mode": "stream", "model.cell": "lstm", "model.embed_size": 16, "model.hidden_size": 24,
            "model.num_layers": 1, "train.batch_size": BATCH_SIZE, "train.bptt": BPTT, "train.lr": 0.005,
            "train.eval_every": 1000, "train.log_every": 1, "train.checkpoint_every": 1000,
            "train.final_samples": 0, "train.device": "cpu", "train.out_dir": str(out_dir)}
    base.update({key.replace("__", "."): value for key, value in values.items()})
    return build_config(base)


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def events(out_dir: Path, split: str) -> list[dict]:
    return [event for event in metrics(out_dir) if event["split"] == split]


def load_payload(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def stream_batches_per_epoch(train_file: Path) -> int:
    """Chunks per epoch in stream mode, computed here from the documented layout: the split is one
    stream (a leading <eos>, every character, an <eos> per line), cut into BATCH_SIZE rows read in
    chunks of BPTT steps, each chunk predicting the next column."""
    tokens = 1 + len(train_file.read_text(encoding="utf-8"))  # each "\n" is one <eos>
    columns = tokens // BATCH_SIZE
    return math.ceil((columns - 1) / BPTT)


def sentence_batches_per_epoch(train_file: Path) -> int:
    lines = [line for line in train_file.read_text(encoding="utf-8").split("\n") if line]
    return math.ceil(len(lines) / BATCH_SIZE)


# -- exact resume -------------------------------------------------------------------------------------

REGULARISED = dict(model__locked_dropout=True, model__embedding_dropout=0.1, model__weight_drop=0.3,
                   train__activation_regularization=2.0, train__temporal_activation_regularization=1.0)


@pytest.mark.parametrize("mode, cell, direction, regularised, precision", [
    ("stream", "lstm", "forward", False, "float32"), ("sentences", "gru", "forward", False, "float32"),
    ("stream", "rnn", "bi", False, "float32"), ("sentences", "lstm", "bi", False, "float32"),
    ("stream", "lstm", "forward", True, "float32"), ("sentences", "gru", "forward", True, "float32"),
    ("stream", "lstm", "forward", False, "bfloat16")])
def test_stop_and_resume_equals_straight_through(tmp_path, corpus, mode, cell, direction, regularised, precision):
    # dropout > 0 makes the result depend on the restored RNG state; bptt 64 keeps every sentence whole.
    settings = dict(data__mode=mode, model__cell=cell, model__num_layers=2, model__dropout=0.3,
                    model__direction=direction, **(REGULARISED if regularised else {}), train__precision=precision,
                    train__bptt=64 if mode == "sentences" else BPTT, train__eval_every=5, train__schedule="constant")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(make_config(corpus, straight, train__max_steps=30, **settings), progress_bar=False)
    first = train(make_config(corpus, stopped, train__max_steps=13, **settings), progress_bar=False)

    per_epoch = (stream_batches_per_epoch(corpus["train"]) if mode == "stream"
                 else sentence_batches_per_epoch(corpus["train"]))
    assert 13 % per_epoch != 0 and 13 // per_epoch >= 1, "test setup: step 13 should be inside a later epoch"
    assert first.progress.step == 13 and first.progress.batch_index == 13 % per_epoch
    if mode == "stream":
        states = load_payload(stopped / "last.pt")["stream_states"]  # carried across the stop, per direction
        assert len(states) == (2 if direction == "bi" else 1) and all(state is not None for state in states)

    resumed = train(make_config(corpus, stopped, train__max_steps=30, **settings), resume=True, progress_bar=False)
    assert resumed.progress.step == 30

    a, b = load_payload(straight / "last.pt"), load_payload(stopped / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), f"weights differ after resume: {name}"
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][index][key])), \
                f"optimizer state differs after resume: {index}.{key}"
    assert a["progress"]["tokens"] == b["progress"]["tokens"]

    # The resumed run appends to the first part's metrics.
    train_steps = [event["step"] for event in events(stopped, "train")]
    assert train_steps == list(range(1, 31))
    assert [e["loss"] for e in events(stopped, "train")] == [e["loss"] for e in events(straight, "train")]


@pytest.mark.parametrize("key, value", [("model.hidden_size", 32), ("data.mode", "sentences"),
                                        ("model.cell", "gru"), ("train.lr", 0.01)])
def test_resume_refuses_a_changed_key(tmp_path, corpus, key, value):
    out_dir = tmp_path / "run"
    train(make_config(corpus, out_dir, train__max_steps=3), progress_bar=False)
    before = (out_dir / "last.pt").read_bytes()
    changed = make_config(corpus, out_dir, train__max_steps=6, **{key.replace(".", "__"): value})
    with pytest.raises(LmtrainError, match=key.replace(".", r"\.")):
        train(changed, resume=True, progress_bar=False)
    assert (out_dir / "last.pt").read_bytes() == before


def test_resume_passes_over_keys_neither_run_reads(tmp_path, corpus):
    """A run's files named by data.train and data.valid leave data.split unread, Adam leaves train.momentum
    unread, a constant rate train.min_lr: a resume whose config changes them goes on. A key the resumed
    config reads is still a difference: train.min_lr with a cosine schedule."""
    out_dir = tmp_path / "run"
    train(make_config(corpus, out_dir, train__max_steps=3), progress_bar=False)
    unread = {"data__split": [0.5, 0.5], "train__momentum": 0.5, "train__min_lr": 1e-4}
    train(make_config(corpus, out_dir, train__max_steps=5, **unread), resume=True, progress_bar=False)
    assert load_payload(out_dir / "last.pt")["progress"]["step"] == 5
    with pytest.raises(LmtrainError, match=r"train\.schedule"):
        train(make_config(corpus, out_dir, train__max_steps=7, train__schedule="cosine", train__min_lr=1e-4),
              resume=True, progress_bar=False)


def test_a_run_started_with_another_initialisation_resumes_with_its_own(tmp_path, corpus):
    """A run started when Zaremba's initialisation was the default (its checkpoint says init: zaremba,
    forget_bias: 1) resumes from the same config, whose `model.init: auto` now means torch's: the keys
    that only decide how weights start keep the run's values, and are not a difference."""
    out_dir = tmp_path / "run"
    train(make_config(corpus, out_dir, train__max_steps=3, model__init="zaremba", model__forget_bias=1.0),
          progress_bar=False)
    resumed = make_config(corpus, out_dir, train__max_steps=5)
    assert (resumed.model.init, resumed.model.forget_bias) == ("torch", None)
    train(resumed, resume=True, progress_bar=False)
    saved = load_payload(out_dir / "last.pt")
    assert saved["progress"]["step"] == 5
    assert (saved["config"]["model"]["init"], saved["config"]["model"]["forget_bias"]) == ("zaremba", 1.0)


def test_resume_refuses_a_corpus_that_changed_unless_asked(tmp_path, corpus):
    """The checkpoint records each corpus file's size and sha256: a corpus edited in place, or cut short,
    is not the data the run trained on (same path, same config)."""
    out_dir = tmp_path / "run"
    train(make_config(corpus, out_dir, train__max_steps=2), progress_bar=False)
    os.utime(corpus["train"], (1, 1))  # the same bytes, touched: the same data
    train(make_config(corpus, out_dir, train__max_steps=3), resume=True, progress_bar=False)
    original = corpus["train"].read_text()
    before = (out_dir / "last.pt").read_bytes()
    corpus["train"].write_text(original.replace("e", "E"))             # same size, other bytes
    with pytest.raises(LmtrainError, match=r"corpus changed since the run's checkpoint: data.train .*train.txt "
                                           r"\(same size, other bytes\).*--allow-changed-data"):
        train(make_config(corpus, out_dir, train__max_steps=5), resume=True, progress_bar=False)
    corpus["train"].write_text(original[:200])                          # cut short
    with pytest.raises(LmtrainError, match=rf"\({len(original.encode()):,} -> 200 bytes\)"):
        train(make_config(corpus, out_dir, train__max_steps=5), resume=True, progress_bar=False)
    assert (out_dir / "last.pt").read_bytes() == before
    warnings = []
    train(make_config(corpus, out_dir, train__max_steps=5), resume=True, progress_bar=False, warn=warnings.append,
          allow_changed_data=True)
    assert any("continuing on it, as --allow-changed-data asks" in line for line in warnings)
    # The checkpoint now records the data it went on with.
    assert load_payload(out_dir / "last.pt")["data_files"]["train"]["size"] == 200


def test_weights_that_are_no_longer_finite_are_never_written(tmp_path, corpus, monkeypatch):
    """A step that leaves an infinite weight: the run stops with one line, no checkpoint holds it, and
    metrics.jsonl stays strict JSON."""
    from lmtrain.training import trainer as train_module

    out_dir = tmp_path / "run"
    real_step = train_module.Trainer._train_step

    def step_that_breaks_a_weight(self, *arguments):  # as an optimizer step gone wrong would
        stop = real_step(self, *arguments)
        if self.progress.step == 3:
            with torch.no_grad():
                next(self.model.parameters())[0] = float("inf")
        return stop

    monkeypatch.setattr(train_module.Trainer, "_train_step", step_that_breaks_a_weight)
    with pytest.raises(LmtrainError, match=r"^stopped at step 3: the weights are no longer finite numbers"):
        train(make_config(corpus, out_dir, train__max_steps=20, train__checkpoint_every=1, train__log_every=1),
              progress_bar=False)
    assert load_payload(out_dir / "last.pt")["progress"]["step"] == 2
    for checkpoint in out_dir.glob("*.pt"):
        assert all(torch.isfinite(t).all() for t in load_payload(checkpoint)["model"].values()), checkpoint
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl: not JSON"))


def test_a_non_finite_loss_is_null_in_metrics_jsonl(tmp_path, corpus, monkeypatch):
    """Strict JSON has no NaN or Infinity: a diverged validation loss is logged as null."""
    from lmtrain.training import validation

    monkeypatch.setattr(validation, "score", lambda *a, **k: validation.Score(loss=float("nan"), tokens=10))
    out_dir = tmp_path / "run"
    train(make_config(corpus, out_dir, train__max_steps=2, train__eval_every=1), progress_bar=False)
    events = [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name}: not JSON"))
              for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    valid = [event for event in events if event["split"] == "valid"]
    assert valid and all(event["loss"] is None and event["ppl"] is None for event in valid)


def test_a_warmup_the_epochs_budget_never_finishes_is_warned_of(tmp_path, corpus):
    warnings = []
    train(make_config(corpus, tmp_path / "run", train__max_steps=None, train__max_epochs=1, train__warmup_steps=10**6),
          progress_bar=False, warn=warnings.append)
    warmup = [line for line in warnings if "warmup" in line]
    assert len(warmup) == 1 and warmup[0].startswith("warning: train.warmup_steps 1000000 is more than the "), warnings
    assert "steps of train.max_epochs 1 (" in warmup[0] and warmup[0].endswith("never reaches train.lr")


def test_a_huge_vocabulary_is_warned_about_and_a_pipe_refused(tmp_path, corpus, monkeypatch):
    from lmtrain.training import optim

    monkeypatch.setattr(optim, "LARGE_VOCABULARY", 10)
    warnings = []
    train(make_config(corpus, tmp_path / "run", train__max_steps=1), progress_bar=False, warn=warnings.append)
    assert any(line.startswith("warning: a vocabulary of ") and "data.max_vocab" in line for line in warnings)
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(LmtrainError, match=r"data.train .*pipe is a pipe, not a regular file: training reads its "
                                           r"corpus more than once"):
        train(make_config({**corpus, "train": tmp_path / "pipe"}, tmp_path / "other", train__max_steps=1),
              progress_bar=False)


def test_resume_without_a_run_is_an_error(tmp_path, corpus):
    with pytest.raises(LmtrainError, match="last.pt"):
        train(make_config(corpus, tmp_path / "empty", train__max_steps=3), resume=True, progress_bar=False)


# -- stopping ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["stream", "sentences"])
def test_max_epochs_stops_at_the_epoch_boundary(tmp_path, corpus, mode):
    bptt = 64 if mode == "sentences" else BPTT
    result = train(make_config(corpus, tmp_path / "run", data__mode=mode, train__bptt=bptt, train__max_epochs=2),
                   progress_bar=False)
    per_epoch = (stream_batches_per_epoch(corpus["train"]) if mode == "stream"
                 else sentence_batches_per_epoch(corpus["train"]))
    assert result.stopped_by == "max_epochs"
    assert result.progress.step == 2 * per_epoch
    assert events(tmp_path / "run", "train")[-1]["step"] == 2 * per_epoch


def test_max_steps_is_respected(tmp_path, corpus):
    result = train(make_config(corpus, tmp_path / "run", train__max_steps=7), progress_bar=False)
    assert result.stopped_by == "max_steps"
    assert result.progress.step == 7
    assert result.progress.tokens == 7 * BATCH_SIZE * BPTT  # seven full chunks, all inside the first epoch
    assert [event["step"] for event in events(tmp_path / "run", "train")] == list(range(1, 8))
    assert load_payload(tmp_path / "run" / "last.pt")["progress"]["step"] == 7


def test_max_seconds_stops(tmp_path, corpus):
    result = train(make_config(corpus, tmp_path / "run", train__max_seconds=0.5, train__log_every=1000),
                   progress_bar=False)
    assert result.stopped_by == "max_seconds"
    assert result.progress.step > 0
    assert 0.5 <= result.progress.train_seconds < 0.5 + 1.5
    assert result.progress.elapsed_seconds < 20


# -- best.pt and the event cadence ------------------------------------------------------------------------

def test_best_checkpoint_holds_the_lowest_validation_loss(tmp_path):
    # Train on "abc" repeated and validate on "acb" repeated: the unigram statistics help both at
    # first, the learned transitions then hurt validation, so the best evaluation is not the last.
    train_file = write_lines(tmp_path / "train.txt", ["abcabcabcabc"] * 60)
    valid_file = write_lines(tmp_path / "valid.txt", ["acbacbacbacb"] * 10)
    out_dir = tmp_path / "run"
    train(make_config({"train": train_file, "valid": valid_file}, out_dir, train__max_steps=60,
                      train__eval_every=3, train__lr=0.02), progress_bar=False)
    valid = events(out_dir, "valid")
    losses = [event["loss"] for event in valid]
    best_index = min(range(len(losses)), key=losses.__getitem__)  # the first of equal minima
    assert best_index < len(losses) - 1, f"test setup: validation loss should rise after its minimum: {losses}"

    best = load_payload(out_dir / "best.pt")
    assert best["progress"]["step"] == valid[best_index]["step"]
    assert best["progress"]["best_valid_loss"] == pytest.approx(losses[best_index], abs=1e-6)
    assert math.isfinite(best["progress"]["best_valid_loss"])
    for name, tensor in best["model"].items():
        assert torch.isfinite(tensor).all(), f"non-finite values in best.pt: {name}"
    numbers, _ = evaluate_checkpoint(str(out_dir / "best.pt"), split="valid")
    assert numbers["loss"] == pytest.approx(losses[best_index], abs=1e-5)
    last = load_payload(out_dir / "last.pt")
    assert any(not torch.equal(tensor, last["model"][name]) for name, tensor in best["model"].items())


def test_eval_log_and_checkpoint_events_come_at_their_steps(tmp_path, corpus, monkeypatch):
    saves: list[tuple[str, int]] = []
    real_last, real_best = RunDirectory.save_last, RunDirectory.save_best

    def recording_last(self, payload, step):
        saves.append(("last.pt", payload["progress"]["step"]))
        real_last(self, payload, step)

    def recording_best(self, payload):
        saves.append(("best.pt", payload["progress"]["step"]))
        real_best(self, payload)

    monkeypatch.setattr(RunDirectory, "save_last", recording_last)
    monkeypatch.setattr(RunDirectory, "save_best", recording_best)
    out_dir = tmp_path / "run"
    train(make_config(corpus, out_dir, train__max_steps=14, train__eval_every=4, train__log_every=3,
                      train__checkpoint_every=6), progress_bar=False)
    assert [event["step"] for event in events(out_dir, "valid")] == [4, 8, 12, 14]  # and once at the end
    assert [event["step"] for event in events(out_dir, "train")] == [3, 6, 9, 12]
    assert [step for name, step in saves if name == "last.pt"] == [6, 12, 14]
    assert {step for name, step in saves if name == "best.pt"} <= {4, 8, 12, 14}
    assert saves[0] == ("best.pt", 4)  # the first evaluation is always the best so far
    keys = {"step", "split", "loss", "ppl", "lr", "tokens_per_s", "elapsed_s"}
    assert all(keys <= event.keys() for event in metrics(out_dir))


# -- what is learned and written ------------------------------------------------------------------------------

def test_loss_decreases_on_a_learnable_corpus(tmp_path):
    pattern = write_lines(tmp_path / "pattern.txt", ["abcdefgh"] * 200)
    out_dir = tmp_path / "run"
    train(make_config({"train": pattern, "valid": pattern}, out_dir, model__hidden_size=32, train__batch_size=8,
                      train__lr=0.01, train__max_steps=60, train__log_every=10), progress_bar=False)
    losses = [event["loss"] for event in events(out_dir, "train")]
    assert len(losses) == 6
    assert losses[-1] < 0.5 * losses[0], losses
    assert events(out_dir, "valid")[-1]["loss"] < 0.5 * losses[0]


def test_saved_config_equals_the_resolved_config(tmp_path, corpus):
    config = make_config(corpus, tmp_path / "run", train__max_steps=2, model__cell="rnn", data__level="word")
    train(config, progress_bar=False)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text(encoding="utf-8"))
    assert saved == dataclasses.asdict(config)
    assert load_payload(tmp_path / "run" / "last.pt")["config"] == dataclasses.asdict(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the resume command a run prints reads this file: not a word about it
        assert load_config(tmp_path / "run" / "config.yaml") == config


def test_cosine_schedule_lowers_the_learning_rate(tmp_path, corpus):
    out_dir = tmp_path / "run"
    train(make_config(corpus, out_dir, train__schedule="cosine", train__lr=0.01, train__min_lr=0.001,
                      train__max_steps=20, train__log_every=2), progress_bar=False)
    rates = [event["lr"] for event in events(out_dir, "train")]
    assert len(rates) == 10
    assert all(later < earlier for earlier, later in zip(rates, rates[1:])), rates
    assert all(0.001 <= rate <= 0.01 for rate in rates)
    assert rates[-1] == pytest.approx(0.001)


def test_checkpoint_loads_with_the_safe_loader(tmp_path, corpus):
    train(make_config(corpus, tmp_path / "run", train__max_steps=3, model__dropout=0.2, model__num_layers=2),
          progress_bar=False)
    for name in ("last.pt", "best.pt"):
        payload = torch.load(tmp_path / "run" / name, weights_only=True)
        assert {"format_version", "config", "tokenizer", "model", "optimizer", "progress", "rng"} <= payload.keys()
        assert payload["progress"]["step"] == 3
        assert isinstance(payload["rng"]["torch"], torch.Tensor)


# -- the bidirectional LM (ELMo) ---------------------------------------------------------------------

def test_bidirectional_lm_trains_both_directions(tmp_path, corpus):
    out_dir = tmp_path / "bi"
    config = make_config(corpus, out_dir, model__direction="bi", train__max_steps=80, train__eval_every=40,
                         train__lr=0.02)
    lines = []
    result = train(config, progress_bar=False, echo=lines.append)
    forward, backward = events(out_dir, "valid"), events(out_dir, "valid_right_to_left")
    assert [e["step"] for e in forward] == [e["step"] for e in backward] == [40, 80]
    # Each evaluation line ends in the mean of the two, the number "(best)" marks and best.pt is picked by.
    shown = [line for line in lines if line.startswith(("step 40: ", "step 80: "))]
    assert [line.split("; mean loss ")[1].removesuffix(" (best)") for line in shown] == [
        f"{(f['loss'] + b['loss']) / 2:.4f}" for f, b in zip(forward, backward)]
    # best.pt follows the mean of the two directions, the training objective.
    assert result.progress.best_valid_loss == pytest.approx(
        min((f["loss"] + b["loss"]) / 2 for f, b in zip(forward, backward)), abs=1e-5)
    numbers, _ = evaluate_checkpoint(str(out_dir / "best.pt"), split="valid")
    assert {"loss", "perplexity", "bpc", "right_to_left_loss", "right_to_left_perplexity",
            "right_to_left_bpc"} <= set(numbers)
    assert numbers["loss"] != numbers["right_to_left_loss"]  # two models, two numbers
    assert numbers["mean_loss"] == pytest.approx(result.progress.best_valid_loss, abs=1e-5)  # the loss best.pt has
    payload = load_payload(out_dir / "best.pt")
    assert any(name.startswith("rnn_right_to_left.") for name in payload["model"])
    # Both LMs learned: each is far below the uniform loss ln(V).
    vocab_size = len(payload["tokenizer"]["tokens"])
    assert numbers["loss"] < math.log(vocab_size) - 0.5 and numbers["right_to_left_loss"] < math.log(vocab_size) - 0.5


def test_forward_only_model_has_no_right_to_left_lm(tmp_path, corpus):
    out_dir = tmp_path / "forward"
    train(make_config(corpus, out_dir, train__max_steps=3), progress_bar=False)
    assert not events(out_dir, "valid_right_to_left")
    numbers, _ = evaluate_checkpoint(str(out_dir / "last.pt"), split="valid")
    assert "right_to_left_loss" not in numbers


def test_sample_every_prints_samples_without_moving_the_training(tmp_path, corpus):
    lines: list[str] = []
    sampled = train(make_config(corpus, tmp_path / "sampled", train__max_steps=12, train__sample_every=5,
                                model__dropout=0.2), echo=lines.append, progress_bar=False)
    plain = train(make_config(corpus, tmp_path / "plain", train__max_steps=12, model__dropout=0.2),
                  progress_bar=False)
    assert [line.splitlines()[0] for line in lines if "samples:" in line] == ["step 5 samples:", "step 10 samples:"]
    assert all(len(line.splitlines()) == 4 for line in lines if "samples:" in line)  # three samples each
    a, b = load_payload(tmp_path / "sampled" / "last.pt"), load_payload(tmp_path / "plain" / "last.pt")
    assert all(torch.equal(a["model"][name], b["model"][name]) for name in a["model"])
    assert sampled.progress.step == plain.progress.step == 12


def test_info_describes_a_checkpoint(tmp_path, corpus):
    from typer.testing import CliRunner

    from lmtrain.cli import app

    out_dir = tmp_path / "run"
    train(make_config(corpus, out_dir, train__max_steps=6, train__eval_every=3), progress_bar=False)
    result = CliRunner().invoke(app, ["info", str(out_dir / "best.pt"), "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output)
    payload = load_payload(out_dir / "best.pt")
    assert facts["step"] == payload["progress"]["step"] and facts["format_version"] == FORMAT_VERSION
    assert (facts["vocab_size"] == len(payload["tokenizer"]["tokens"])
            and facts["first_tokens"][:2] == ["<unk>", "<eos>"])
    assert facts["parameters"] == sum(t.numel() for t in payload["model"].values())
    assert facts["best_valid_loss"] == pytest.approx(min(e["loss"] for e in events(out_dir, "valid")), abs=1e-6)
    text = CliRunner().invoke(app, ["info", str(out_dir / "best.pt")]).output
    assert "lstm 1x24" in text and "config:" in text


def test_tensorboard_without_the_package_is_a_clear_error(tmp_path, corpus, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name == "tensorboard":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(LmtrainError, match="pip install tensorboard"):
        train(make_config(corpus, tmp_path / "run", train__max_steps=2, train__tensorboard=True), progress_bar=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_tensorboard_logs_scalars(tmp_path, corpus):
    pytest.importorskip("tensorboard")
    out_dir = tmp_path / "run"
    train(make_config(corpus, out_dir, train__max_steps=4, train__log_every=2, train__eval_every=2,
                      train__tensorboard=True), progress_bar=False)
    assert list((out_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_cosine_over_max_seconds_decays_with_training_time(tmp_path, corpus):
    """`train.schedule: cosine` with only `train.max_seconds`: the logged rate falls from lr towards
    min_lr as training time is spent, and ends below a tenth of lr."""
    run = tmp_path / "run"
    train(make_config(corpus, run, train__max_steps=None, train__max_seconds=1.5, train__schedule="cosine",
                      train__lr=0.01, train__min_lr=0.0), progress_bar=False)
    rates = [event["lr"] for event in events(run, "train")]
    assert rates[0] > 0.009 and rates[-1] < 0.001
    assert all(later <= earlier for earlier, later in zip(rates, rates[1:]))


def test_a_run_that_fails_on_a_terminal_closes_its_bar(tmp_path, corpus, monkeypatch):
    """A run stopped by an error mid-way (here, a validation that fails) still closes its progress bar, so the
    error line is not drawn into a half-finished bar."""
    from lmtrain.training import trainer as trainer_module

    bars = []

    class Bar(trainer_module.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})
            self.closed = False
            bars.append(self)

        def close(self):
            self.closed = True
            super().close()

    def failing_validation(self):
        raise LmtrainError("validation failed")

    monkeypatch.setattr(trainer_module, "tqdm", Bar)
    monkeypatch.setattr(trainer_module.sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr(trainer_module.Trainer, "_evaluate", failing_validation)
    with pytest.raises(LmtrainError, match="validation failed"):
        train(make_config(corpus, tmp_path / "run", train__max_steps=4, train__eval_every=2))
    assert len(bars) == 1 and bars[0].closed


def test_ctrl_c_during_the_final_evaluation_keeps_the_last_steps(tmp_path, corpus, monkeypatch):
    """A Ctrl-C while the run evaluates and saves its last step lets both finish: last.pt holds every step."""
    import signal

    from lmtrain.training import trainer as trainer_module

    evaluate = trainer_module.Trainer._evaluate

    def interrupted(self):
        os.kill(os.getpid(), signal.SIGINT)  # delivered at once, in the middle of the evaluation
        return evaluate(self)

    monkeypatch.setattr(trainer_module.Trainer, "_evaluate", interrupted)
    result = train(make_config(corpus, tmp_path / "run", train__max_steps=5), progress_bar=False)
    assert result.progress.step == 5 and result.valid_loss is not None
    assert load_payload(tmp_path / "run" / "last.pt")["progress"]["step"] == 5


def test_a_terminal_that_reports_no_size_still_gets_a_bar():
    """tqdm on a terminal of 0 x 0 (`script` on a terminal of unset size) drew nothing."""
    import fcntl
    import pty
    import struct
    import termios

    from lmtrain.training.trainer import bar_size

    main, side = pty.openpty()  # a new pseudo-terminal has no size until one is set
    try:
        with os.fdopen(side, "w", closefd=False) as stream:
            fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
            assert bar_size(stream) == {"ncols": 80, "nrows": 24}
            fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", 0, 100, 0, 0))
            assert bar_size(stream) == {"ncols": 100, "nrows": 24}
            fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
            assert bar_size(stream) == {"dynamic_ncols": True}
    finally:
        os.close(main)
        os.close(side)


def test_the_printed_resume_command_pastes_into_a_shell_as_it_is():
    """A folder name with spaces or `$(...)` is quoted, so pasting the line runs lmtrain on that folder."""
    import shlex

    from lmtrain.training.distributed import World
    from lmtrain.training.resume import resume_command

    out_dir = Path("runs/my run ☃ $(id)")
    command = resume_command(out_dir, World())
    assert shlex.split(command) == ["lmtrain", "train", str(out_dir / "config.yaml"), "--resume"]
    assert resume_command(Path("/tmp/run"), World(size=2, local_size=2)) == \
        "lmtrain train /tmp/run/config.yaml --resume --nproc 2"
