"""The run folder: step checkpoints and pruning, fallback to an intact checkpoint, the lock, a full
disk, metrics after a crash, and non-finite steps. In-process, tiny runs."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from corpus_helpers import train_and_valid

import lmtrain.files as files_module
import lmtrain.speed.loss as loss_module
from lmtrain.config import build_config
from lmtrain.errors import LmtrainError
from lmtrain.training.rundir import RunDirectory
from lmtrain.training.trainer import train


@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, Path]:
    return train_and_valid(tmp_path)


def config(corpus, out_dir: Path, **values):
    base = {"data.train": str(corpus["train"]), "data.valid": str(corpus["valid"]), "model.embed_size": 8,
            "model.hidden_size": 8, "model.num_layers": 1, "train.batch_size": 4, "train.bptt": 8,
            "train.eval_every": 1000, "train.checkpoint_every": 2, "train.final_samples": 0,
            "train.device": "cpu", "train.out_dir": str(out_dir), "train.max_steps": 10}
    base.update({key.replace("__", "."): value for key, value in values.items()})
    return build_config(base)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_keep_last_prunes_old_step_files_and_last_is_the_newest(tmp_path, corpus):
    out_dir = tmp_path / "run"
    train(config(corpus, out_dir, train__keep_last=3), progress_bar=False)
    steps = sorted(p.name for p in out_dir.glob("step-*.pt"))
    assert steps == ["step-0000006.pt", "step-0000008.pt", "step-0000010.pt"]
    assert (out_dir / "last.pt").read_bytes() == (out_dir / "step-0000010.pt").read_bytes()
    assert not list(out_dir.glob(".*tmp")) and not list(out_dir.glob(".*link"))


def test_keep_last_zero_writes_only_last(tmp_path, corpus):
    out_dir = tmp_path / "run"
    train(config(corpus, out_dir, train__keep_last=0), progress_bar=False)
    assert not list(out_dir.glob("step-*.pt")) and (out_dir / "last.pt").exists()


def test_resuming_with_fewer_step_files_kept_prunes_the_earlier_runs(tmp_path, corpus):
    out_dir = tmp_path / "run"
    train(config(corpus, out_dir, train__keep_last=3, train__max_steps=6), progress_bar=False)
    train(config(corpus, out_dir, train__keep_last=1, train__max_steps=8), resume=True, progress_bar=False)
    assert [p.name for p in out_dir.glob("step-*.pt")] == ["step-0000008.pt"]
    train(config(corpus, out_dir, train__keep_last=0, train__max_steps=10), resume=True, progress_bar=False)
    assert not list(out_dir.glob("step-*.pt"))
    assert torch.load(out_dir / "last.pt", weights_only=True)["progress"]["step"] == 10


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, corpus, damage):
    out_dir, straight = tmp_path / "run", tmp_path / "straight"
    train(config(corpus, straight, train__max_steps=12), progress_bar=False)
    train(config(corpus, out_dir, train__max_steps=10), progress_bar=False)
    last = out_dir / "last.pt"
    data = last.read_bytes()
    last.unlink()  # last.pt and step-0000010.pt are one file (a hard link): damage last.pt alone
    if damage == "truncate":
        last.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        last.write_bytes(b"not a checkpoint at all")
    (out_dir / "step-0000010.pt").write_bytes(data[:100])  # the newest step file is damaged too
    messages: list[str] = []
    result = train(config(corpus, out_dir, train__max_steps=12), resume=True, echo=messages.append,
                   progress_bar=False)
    assert result.progress.step == 12
    if damage != "delete":
        assert any("last.pt" in m and "older" in m for m in messages)
    assert any("resuming" in m and "step-0000008.pt" in m for m in messages)
    reference, resumed = weights(straight / "last.pt"), weights(out_dir / "last.pt")
    assert all(torch.equal(reference[name], resumed[name]) for name in reference)  # still exact from step 8


def test_resume_with_every_checkpoint_damaged_is_a_clear_error(tmp_path, corpus):
    out_dir = tmp_path / "run"
    train(config(corpus, out_dir, train__keep_last=0), progress_bar=False)
    for path in out_dir.glob("*.pt"):
        path.write_bytes(b"junk")
    with pytest.raises(LmtrainError, match="no intact checkpoint"):
        train(config(corpus, out_dir), resume=True, progress_bar=False)


def test_a_second_training_on_the_same_folder_is_refused(tmp_path, corpus):
    out_dir = tmp_path / "run"
    holder = RunDirectory(out_dir)
    holder.create()
    holder.lock()
    try:
        with pytest.raises(LmtrainError, match=f"another training \\(pid {os.getpid()}\\)"):
            train(config(corpus, out_dir), progress_bar=False)
    finally:
        holder.unlock()
    train(config(corpus, out_dir), progress_bar=False)  # the lock released, the folder is usable


def test_a_resume_is_refused_before_it_reads_a_folder_in_use(tmp_path, corpus):
    """`--resume` on a folder another training is writing is refused at once: it neither says it resumes
    nor reads a checkpoint the other is about to replace (and would then redo the other's last steps)."""
    out_dir = tmp_path / "run"
    train(config(corpus, out_dir, train__max_steps=4), progress_bar=False)
    holder = RunDirectory(out_dir)
    holder.lock()
    lines = []
    try:
        with pytest.raises(LmtrainError, match=f"another training \\(pid {os.getpid()}\\)"):
            train(config(corpus, out_dir, train__max_steps=6), resume=True, progress_bar=False, echo=lines.append)
    finally:
        holder.unlock()
    assert not any(line.startswith("resuming") for line in lines)
    result = train(config(corpus, out_dir, train__max_steps=6), resume=True, progress_bar=False)
    assert result.progress.step == 6  # the refused resume let the folder go again


def test_a_new_run_looks_again_under_the_lock(tmp_path, corpus):
    """A new run that found its folder empty, but where another run finished before it took the lock,
    is refused there rather than writing over that run's checkpoints."""
    from lmtrain.training.trainer import Trainer

    out_dir = tmp_path / "run"
    late = Trainer(config(corpus, out_dir), resume=False, echo=lambda line: None, warn=lambda line: None,
                   progress_bar=False)
    finished = train(config(corpus, out_dir, train__max_steps=4), progress_bar=False)
    before = (out_dir / "last.pt").read_bytes()
    with pytest.raises(LmtrainError, match="already holds a run"):
        late.run()
    assert (out_dir / "last.pt").read_bytes() == before and finished.progress.step == 4
    train(config(corpus, out_dir, train__max_steps=6), resume=True, progress_bar=False)  # and the lock is free


def test_a_folder_holding_only_best_pt_is_a_run_not_an_empty_folder(tmp_path, corpus):
    """A run stopped after its first evaluation but before its first periodic checkpoint leaves best.pt
    alone: a new run there is refused (it would replace best.pt and cut metrics.jsonl), a resume continues."""
    out_dir = tmp_path / "run"
    train(config(corpus, out_dir, train__max_steps=4, train__eval_every=2), progress_bar=False)
    for path in [out_dir / "last.pt", *out_dir.glob("step-*.pt")]:
        path.unlink()
    best, metrics = (out_dir / "best.pt").read_bytes(), (out_dir / "metrics.jsonl").read_bytes()
    with pytest.raises(LmtrainError, match=r"already holds a run \(best.pt\): add --resume"):
        train(config(corpus, out_dir, train__max_steps=4, train__eval_every=2), progress_bar=False)
    assert (out_dir / "best.pt").read_bytes() == best and (out_dir / "metrics.jsonl").read_bytes() == metrics
    result = train(config(corpus, out_dir, train__max_steps=6, train__eval_every=2), resume=True, progress_bar=False)
    assert result.progress.step == 6


def test_resuming_a_finished_run_logs_its_last_evaluation_once(tmp_path, corpus):
    out_dir = tmp_path / "run"
    settings = dict(train__max_steps=4, train__eval_every=3)  # the last evaluation is the final one, at step 4
    train(config(corpus, out_dir, **settings), progress_bar=False)
    first = (out_dir / "metrics.jsonl").read_text(encoding="utf-8")
    for _ in range(2):
        train(config(corpus, out_dir, **settings), resume=True, progress_bar=False)
    assert (out_dir / "metrics.jsonl").read_text(encoding="utf-8") == first
    steps = [(event["step"], event["split"]) for event in map(json.loads, first.splitlines())]
    assert steps.count((4, "valid")) == 1 and (3, "valid") in steps


def test_resuming_a_finished_run_leaves_its_checkpoints_as_they_are(tmp_path, corpus):
    """Nothing to train: last.pt and the step files are not written again (a write could only fail, on a
    full disk, or move their times); a smaller keep_last still prunes."""
    out_dir = tmp_path / "run"
    train(config(corpus, out_dir, train__max_steps=6, train__keep_last=3), progress_bar=False)
    files = ["last.pt", "step-0000004.pt", "step-0000006.pt"]
    before = {name: (out_dir / name).stat() for name in files}
    result = train(config(corpus, out_dir, train__max_steps=6, train__keep_last=2), resume=True, progress_bar=False)
    assert result.progress.step == 6
    for name in files:
        after = (out_dir / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before[name].st_ino, before[name].st_mtime_ns), name
    assert sorted(p.name for p in out_dir.glob("step-*.pt")) == ["step-0000004.pt", "step-0000006.pt"]


def test_a_full_disk_under_metrics_jsonl_is_one_line(tmp_path):
    from lmtrain.training.metrics import Metrics

    run_dir = RunDirectory(tmp_path / "run")
    run_dir.create()
    metrics = Metrics(run_dir, resumed_at=None, tensorboard=False)

    class FullDisk:
        def write(self, text=""):
            raise OSError(errno.ENOSPC, "No space left on device")

        flush = close = write

    metrics.file = FullDisk()
    with pytest.raises(LmtrainError, match=r"^cannot write .*metrics.jsonl: the disk is full$"):
        metrics.write({"step": 1, "split": "train"})
    metrics.close()  # said once: closing the same file does not raise again


def test_a_lock_left_by_a_killed_process_is_not_stale(tmp_path, corpus):
    out_dir = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, signal
        from lmtrain.training.rundir import RunDirectory
        run = RunDirectory({str(out_dir)!r}); run.create(); run.lock()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    subprocess.run([sys.executable, "-c", script], check=False, timeout=60)
    assert (out_dir / "lock").exists()
    result = train(config(corpus, out_dir), progress_bar=False)
    assert result.progress.step == 10


def test_train_leaves_the_callers_random_state_as_it_was(tmp_path, corpus):
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    train(config(corpus, tmp_path / "run", train__max_steps=2), progress_bar=False)
    assert torch.equal(torch.get_rng_state(), before)


def test_train_checks_a_config_changed_in_python(tmp_path, corpus):
    """A Config is a dataclass: changed after loading it is checked again, by key, before anything runs."""
    changed = config(corpus, tmp_path / "run")
    changed.train.eval_every = 0  # an integer modulo by zero at the first step, before
    with pytest.raises(LmtrainError, match=r"^train.eval_every must be positive; got 0"):
        train(changed, progress_bar=False)
    changed.train.eval_every, changed.model.cell = 1000, "LSTM"
    with pytest.raises(LmtrainError, match=r"^model.cell must be one of rnn, gru, lstm; got 'LSTM'"):
        train(changed, progress_bar=False)
    changed.model.cell, changed.train.learning_rate = "lstm", 1e-3  # no such key: it would change nothing
    with pytest.raises(LmtrainError, match=r"^unknown config key 'train.learning_rate'"):
        train(changed, progress_bar=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(TypeError, match="config must be an lmtrain.config.Config"):
        train("configs/quickstart.yaml", progress_bar=False)


def test_files_of_the_run_folder_that_are_links_never_have_their_targets_written(tmp_path, corpus):
    """A lock that is a symbolic link is refused (the pid would overwrite what it names); metrics.jsonl
    that is one is replaced by a file of the run's own, as every checkpoint is."""
    out_dir, elsewhere = tmp_path / "run", tmp_path / "notes.txt"
    out_dir.mkdir()
    elsewhere.write_text("keep me\n")
    (out_dir / "lock").symlink_to(elsewhere)
    with pytest.raises(LmtrainError, match=r"lock is a symbolic link, which lmtrain never makes; remove it"):
        train(config(corpus, out_dir), progress_bar=False)
    (out_dir / "lock").unlink()
    (out_dir / "metrics.jsonl").symlink_to(elsewhere)
    train(config(corpus, out_dir, train__max_steps=4), progress_bar=False)
    assert elsewhere.read_text() == "keep me\n"
    assert not (out_dir / "metrics.jsonl").is_symlink() and '"step": 4' in (out_dir / "metrics.jsonl").read_text()


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, corpus, monkeypatch):
    out_dir = tmp_path / "run"
    train(config(corpus, out_dir, train__max_steps=4), progress_bar=False)
    before = (out_dir / "last.pt").read_bytes()
    real_fsync = os.fsync

    def full_disk(descriptor):
        if ".pt." in os.readlink(f"/proc/self/fd/{descriptor}"):  # checkpoints only, not config.yaml
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(descriptor)

    monkeypatch.setattr(files_module.os, "fsync", full_disk)
    with pytest.raises(LmtrainError) as caught:
        train(config(corpus, out_dir, train__max_steps=8), resume=True, progress_bar=False)
    monkeypatch.setattr(files_module.os, "fsync", real_fsync)
    message = str(caught.value)
    assert "disk is full" in message and "\n" not in message
    assert message.endswith("; the checkpoints written before are intact")
    assert (out_dir / "last.pt").read_bytes() == before
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_a_failed_first_checkpoint_claims_no_earlier_one(tmp_path, corpus, monkeypatch):
    def full_disk(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files_module.os, "fsync", full_disk)
    with pytest.raises(LmtrainError) as caught:
        train(config(corpus, tmp_path / "run", train__max_steps=2), progress_bar=False)
    assert "disk is full" in str(caught.value) and "intact" not in str(caught.value)


def test_files_half_written_by_a_killed_run_are_removed_when_the_folder_is_taken(tmp_path, corpus):
    out_dir = tmp_path / "run"
    train(config(corpus, out_dir, train__max_steps=4), progress_bar=False)
    leftovers = [out_dir / ".step-0000006.pt.k3j2h1.tmp", out_dir / ".last.pt.link", out_dir / ".metrics.jsonl.x.tmp"]
    for leftover in leftovers:
        leftover.write_bytes(b"half a checkpoint")
    (out_dir / "notes.tmp").write_text("the user's own")
    train(config(corpus, out_dir, train__max_steps=6), resume=True, progress_bar=False)
    assert not any(leftover.exists() for leftover in leftovers)
    assert (out_dir / "notes.tmp").exists()


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path, corpus):
    out_dir = tmp_path / "run"
    train(config(corpus, out_dir, train__max_steps=6, train__log_every=1, train__checkpoint_every=4,
                 train__keep_last=0), progress_bar=False)
    # Pretend the run died after step 6 but its last checkpoint is from step 4.
    step4 = out_dir / "last.pt"
    four = torch.load(step4, weights_only=True)
    assert four["progress"]["step"] == 6
    train(config(corpus, tmp_path / "four", train__max_steps=4, train__keep_last=0), progress_bar=False)
    step4.write_bytes((tmp_path / "four" / "last.pt").read_bytes())
    with open(out_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 7, "split": "tr')  # a line cut short by the crash
    train(config(corpus, out_dir, train__max_steps=6, train__log_every=1, train__checkpoint_every=4,
                 train__keep_last=0), resume=True, progress_bar=False)
    steps = [json.loads(line)["step"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()
             if '"train"' in line]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_non_finite_steps_are_skipped_then_training_stops(tmp_path, corpus, monkeypatch):
    out_dir = tmp_path / "run"
    train(config(corpus, out_dir, train__max_steps=4), progress_bar=False)
    good = (out_dir / "last.pt").read_bytes()
    real = loss_module.projected_nll
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        total = real(*args, **kwargs)
        if not torch.is_grad_enabled():  # evaluation
            return total
        calls["n"] += 1
        return total * float("nan") if calls["n"] > 2 else total  # from the 3rd step on

    monkeypatch.setattr(loss_module, "projected_nll", poisoned)
    messages: list[str] = []
    with pytest.raises(LmtrainError, match=r"3 steps in a row had a non-finite loss"):
        train(config(corpus, out_dir, train__max_steps=20, train__max_bad_steps=3), resume=True,
              echo=messages.append, progress_bar=False)
    assert sum("skipped" in m for m in messages) == 3
    assert (out_dir / "last.pt").read_bytes() == good or torch.load(out_dir / "last.pt", weights_only=True)[
        "progress"]["step"] <= 6  # the checkpoint written at step 6 came from two good steps


def test_a_single_bad_step_is_skipped_and_training_goes_on(tmp_path, corpus, monkeypatch):
    real = loss_module.projected_nll
    calls = {"n": 0}

    def once(*args, **kwargs):
        total = real(*args, **kwargs)
        if not torch.is_grad_enabled():  # evaluation
            return total
        calls["n"] += 1
        return total * float("inf") if calls["n"] == 3 else total

    monkeypatch.setattr(loss_module, "projected_nll", once)
    out_dir = tmp_path / "run"
    messages: list[str] = []
    result = train(config(corpus, out_dir), echo=messages.append, progress_bar=False)
    assert result.progress.step == 10 and sum("skipped" in m for m in messages) == 1
    assert all(torch.isfinite(t).all() for t in weights(out_dir / "last.pt").values())


def test_a_misspelt_section_or_a_name_of_ones_own_on_a_config(tmp_path, corpus):
    """A section set under a misspelt name is refused like a key; a name of one's own (`_note`) is left
    alone: it is no setting."""
    changed = config(corpus, tmp_path / "run", train__max_steps=1)
    changed.trian = changed.train
    with pytest.raises(LmtrainError, match=r"^unknown config section 'trian' \(did you mean 'train'\?\)"):
        train(changed, progress_bar=False)
    del changed.trian
    changed._note, changed.train._note = "mine", "mine too"
    assert train(changed, progress_bar=False).progress.step == 1
