"""lmtrain.speed.threads: the cores a process may use (affinity, cgroup quota), the load of other processes
read from /proc/stat, and `train.threads: auto` following it, with real competing processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmtrain.speed import threads
from lmtrain.speed.threads import Load, ThreadCount, allowed_cores, cgroup_quota

# Real processes, builds or whole training runs: `pytest -m "not slow"` leaves this file out.
pytestmark = pytest.mark.slow

LINUX = Path("/proc/stat").exists() and hasattr(os, "sched_getaffinity")


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_is_the_smallest_on_the_way_up(tmp_path):
    write(tmp_path / "proc" / "cgroup", "0::/job/step\n")
    write(tmp_path / "fs" / "job" / "step" / "cpu.max", "max 100000\n")
    write(tmp_path / "fs" / "job" / "cpu.max", "150000 100000\n")
    write(tmp_path / "fs" / "cpu.max", "400000 100000\n")
    assert cgroup_quota(tmp_path / "fs", tmp_path / "proc" / "cgroup") == 1.5


def test_cgroup_v1_quota_and_none(tmp_path):
    write(tmp_path / "proc" / "cgroup", "4:memory:/x\n2:cpu,cpuacct:/job\n")
    write(tmp_path / "fs" / "cpu,cpuacct" / "job" / "cpu.cfs_quota_us", "200000\n")
    write(tmp_path / "fs" / "cpu,cpuacct" / "job" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_quota(tmp_path / "fs", tmp_path / "proc" / "cgroup") == 2.0
    write(tmp_path / "fs" / "cpu,cpuacct" / "job" / "cpu.cfs_quota_us", "-1\n")
    assert cgroup_quota(tmp_path / "fs", tmp_path / "proc" / "cgroup") is None
    assert cgroup_quota(tmp_path / "fs", tmp_path / "missing") is None


def test_a_quota_below_the_affinity_caps_the_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    monkeypatch.setattr(threads, "cgroup_quota", lambda: 2.5)
    assert allowed_cores() == (2, "cgroup CPU quota 2.5")
    monkeypatch.setattr(threads, "cgroup_quota", lambda: 0.5)
    assert allowed_cores() == (1, "cgroup CPU quota 0.5")
    monkeypatch.setattr(threads, "cgroup_quota", lambda: None)
    assert allowed_cores() == (8, "CPU affinity")


def test_a_fixed_count_is_used_as_it_is(monkeypatch):
    previous = torch.get_num_threads()
    monkeypatch.setattr(threads, "allowed_cores", lambda: (4, "CPU affinity"))
    count = ThreadCount(3, environment={})
    assert count.start() == "3 threads (train.threads)" and torch.get_num_threads() == 3
    assert count.follow() is None
    count.restore()
    assert torch.get_num_threads() == previous
    from_environment = ThreadCount("auto", environment={"OMP_NUM_THREADS": "1"})
    assert from_environment.start() == "1 thread (OMP_NUM_THREADS)"
    from_environment.restore()
    too_many = ThreadCount(6, environment={})
    assert too_many.start() == ("6 threads (train.threads; more than the 4 cores this process may use: the threads "
                                "wait on each other)")
    too_many.restore()


class FakeLoad:
    """What other processes keep busy, one reading per call."""

    def __init__(self, *readings: float | None) -> None:
        self.readings = list(readings)

    def others(self, *, at_least: float = 0.0) -> float | None:
        return self.readings.pop(0)


@pytest.mark.parametrize("others, expected", [(None, 4), (0.0, 4), (0.2, 4), (0.3, 3), (0.7, 3), (1.0, 3),
                                              (1.3, 2), (3.9, 1), (7.5, 1)])
def test_auto_takes_the_cores_that_others_leave(monkeypatch, others, expected):
    monkeypatch.setattr(threads, "allowed_cores", lambda: (4, "CPU affinity"))
    count = ThreadCount("auto", load=FakeLoad(others), environment={})
    try:
        count.start()
        assert count.count == expected == torch.get_num_threads()
    finally:
        count.restore()


def test_auto_follows_the_load_when_two_readings_agree(monkeypatch):
    monkeypatch.setattr(threads, "allowed_cores", lambda: (2, "CPU affinity"))
    monkeypatch.setattr(threads, "INTERVAL", 0.0)
    count = ThreadCount("auto", load=FakeLoad(0.0, 1.0, 0.0, 1.0, 1.0, 0.9, 0.1, 0.0), environment={})
    try:
        assert count.start() == "2 threads (auto: 2 cores (CPU affinity), 0.0 kept busy by other processes)"
        assert [count.follow() for _ in range(3)] == [None, None, None]  # 1.0, 0.0, 1.0: no change yet
        assert count.count == 2
        assert count.follow() == "threads: 2 -> 1 (2 cores (CPU affinity), 1.0 kept busy by other processes)"
        assert torch.get_num_threads() == 1
        assert count.follow() is None                                    # 0.9: still 1
        assert count.follow() is None and count.follow() is not None     # 0.1, 0.0: back to 2
        assert count.count == 2 == torch.get_num_threads()
    finally:
        count.restore()


@pytest.mark.skipif(not LINUX, reason="reads /proc/stat")
def test_the_load_of_a_real_competing_process_is_seen():
    """One CPU-bound process beside this one adds about one busy core; this process's own work is not
    counted. (Skipped when the machine is already busy: there is then no quiet baseline to add to.)"""
    cpus = sorted(os.sched_getaffinity(0))
    before = Load()
    time.sleep(0.5)
    baseline = before.others()
    if baseline > 0.3:
        pytest.skip(f"other processes already keep {baseline:.1f} cores busy")
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(competitor.pid, cpus[:1])
        time.sleep(0.3)
        load = Load()
        end = time.monotonic() + 1.0
        while time.monotonic() < end:  # busy ourselves: not counted as another's
            pass
        busy = load.others()
    finally:
        competitor.kill()
        competitor.wait()
    assert 0.6 < busy - baseline and busy < baseline + 1.4


@pytest.mark.skipif(not LINUX, reason="reads /proc/stat")
def test_training_says_its_threads_and_records_them(tmp_path, config_factory, monkeypatch):
    from lmtrain.training.trainer import train

    monkeypatch.delenv("OMP_NUM_THREADS")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat\nthe dog ran\n" * 20, encoding="utf-8")
    config = config_factory(**{"data.path": str(corpus), "train.out_dir": str(tmp_path / "run"),
                               "train.max_steps": 2, "train.log_every": 1, "model.hidden_size": 8,
                               "data.cache": False, "train.device": "cpu", "train.final_samples": 0})
    lines = []
    previous = torch.get_num_threads()
    train(config, echo=lines.append)
    model_line = next(line for line in lines if line.startswith("model: "))
    cores = allowed_cores()[0]
    assert ", device cpu, " in model_line and "thread" in model_line and f"auto: {cores} core" in model_line
    events = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert events and all('"threads": ' in line for line in events)
    assert torch.get_num_threads() == previous  # the caller's count is given back


@pytest.mark.parametrize("value, kept", [("3", True), (" 2 ", True), ("1024", True), ("0", False), ("-1", False),
                                         ("abc", False), ("", False), ("\uff12", False), ("\u0662", False),
                                         ("2.5", False), ("1025", False), ("99999999999999999999", False)])
def test_omp_num_threads_is_kept_only_as_a_sane_count(value, kept):
    from lmtrain.cli import drop_unusable_thread_setting

    environment = {"OMP_NUM_THREADS": value}
    warning = drop_unusable_thread_setting(environment)
    assert ("OMP_NUM_THREADS" in environment) == kept and (warning is None) == kept
    if warning is not None:
        assert warning.startswith(f"warning: OMP_NUM_THREADS={value!r} is not a thread count from 1 to 1024")
    assert drop_unusable_thread_setting({}) is None


@pytest.mark.parametrize("value", ["0", "1000000"])
def test_an_unusable_omp_num_threads_is_one_warning_and_no_openmp_noise(tmp_path, value):
    """OpenMP complains about 0 itself, and a million threads crashed torch: lmtrain drops the variable first."""
    result = subprocess.run([sys.executable, "-m", "lmtrain", "info", "missing.pt"], cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": value}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"warning: OMP_NUM_THREADS='{value}' is not a thread count") and len(lines) == 2, lines
    assert lines[1].startswith("error: ") and "libgomp" not in result.stderr
