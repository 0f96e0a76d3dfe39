"""Exact resume after SIGKILL, with real processes: a training killed at an arbitrary moment and resumed
with --resume ends with weights bit-identical to a run that was never interrupted (CPU)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

# Real processes, builds or whole training runs: `pytest -m "not slow"` leaves this file out.
pytestmark = pytest.mark.slow

STEPS = 300  # long enough that a kill within 0.4 s of the first checkpoint lands before the end
WORDS = "the a cat cats dog dogs was were full ran on under mat big small".split()


def write_config(folder: Path, mode: str) -> Path:
    rng = random.Random(11)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) for _ in range(400)]
    (folder / "train.txt").write_text("\n".join(lines[:360]) + "\n")
    (folder / "valid.txt").write_text("\n".join(lines[360:]) + "\n")
    config = folder / "config.yaml"
    config.write_text(
        "data: {train: train.txt, valid: valid.txt, level: char, mode: %s}\n"
        "model: {cell: lstm, embed_size: 8, hidden_size: 16, num_layers: 2, dropout: 0.2}\n"
        "train: {batch_size: 8, bptt: 24, max_steps: %d, eval_every: 50, checkpoint_every: 7, keep_last: 2,\n"
        "        schedule: cosine, warmup_steps: 10, final_samples: 0, device: cpu}\n" % (mode, STEPS))
    return config


def lmtrain(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmtrain", "train", *args, "--no-progress"]


def run_mode(folder: Path, mode: str, kill_after: float) -> tuple[Path, Path, int]:
    config = write_config(folder, mode)
    straight, killed = folder / "straight", folder / "killed"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    reference = subprocess.Popen(lmtrain(str(config), f"train.out_dir={straight}"), env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    victim = subprocess.Popen(lmtrain(str(config), f"train.out_dir={killed}"), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "last.pt").exists():
        assert victim.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.01)
    time.sleep(kill_after)  # an arbitrary moment: mid-step, mid-evaluation or mid-write
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = torch.load(killed / "last.pt", weights_only=True)["progress"]["step"]
    resumed = subprocess.run(lmtrain(str(config), f"train.out_dir={killed}", "--resume"), env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert reference.wait(timeout=300) == 0
    return straight / "last.pt", killed / "last.pt", killed_at


@pytest.mark.parametrize("mode", ["stream", "sentences"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, mode):
    seed = int.from_bytes(os.urandom(2), "little")
    kill_after = random.Random(seed).uniform(0.05, 0.4)
    with ThreadPoolExecutor(1) as pool:
        straight, resumed, killed_at = pool.submit(run_mode, tmp_path, mode, kill_after).result()
    assert killed_at < STEPS, f"the kill came after the run ended (kill_after={kill_after:.2f}s)"
    # A kill mid-write leaves a half-written `.step-*.pt.*.tmp`: the resumed run removed any there was.
    assert not [path.name for path in resumed.parent.iterdir() if path.name.startswith(".")]
    a, b = torch.load(straight, weights_only=True), torch.load(resumed, weights_only=True)
    assert a["progress"]["step"] == b["progress"]["step"] == STEPS
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), f"{name} differs (killed at step {killed_at}, seed {seed})"
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][index][key]))


@pytest.mark.parametrize("signal_number, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_save_and_say_how_to_resume(tmp_path, signal_number, exit_code):
    config = write_config(tmp_path, "stream")
    out_dir = tmp_path / "run"
    process = subprocess.Popen(lmtrain(str(config), f"train.out_dir={out_dir}", "train.max_steps=100000"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out_dir / "last.pt").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal_number)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == exit_code
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stopped by SIG") and "--resume" in lines[0]
    assert "Traceback" not in stdout + stderr
    step = torch.load(out_dir / "last.pt", weights_only=True)["progress"]["step"]
    assert 7 <= step < 100000


def test_a_token_cache_truncated_under_a_training_is_reported_and_the_steps_kept(tmp_path):
    """Another process truncates the memory-mapped token cache while a real training runs: one error line
    naming the file, exit 2, and last.pt written at the step it stopped (not a silent SIGBUS)."""
    config = write_config(tmp_path, "stream")
    out_dir, cache = tmp_path / "run", tmp_path / "cache"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "LMTRAIN_CACHE": str(cache)}
    process = subprocess.Popen(lmtrain(str(config), f"train.out_dir={out_dir}", "train.max_steps=1000000"), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out_dir / "last.pt").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    ids = next((cache / "tokens").glob("*.ids"))
    os.truncate(ids, 0)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: the token cache file {ids} changed while it was in use: ")
    assert lines[0].endswith("; the corpus is read again with --resume") and "another process" in lines[0]
    step = torch.load(out_dir / "last.pt", weights_only=True)["progress"]["step"]
    assert step >= 7  # written as it stopped, at or past the first periodic checkpoint
    resumed = subprocess.run(lmtrain(str(config), f"train.out_dir={out_dir}", "--resume",
                                     f"train.max_steps={step + 2}"),
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr  # the damaged entry is tokenized again
