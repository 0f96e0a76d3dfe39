"""How many threads the products and the compiled loops use: `train.threads`, `auto` by default.

Why it matters: every time step of a recurrence ends at a barrier where all threads wait for the
slowest (the next product needs the whole a(t)), in oneDNN's products and in lmtrain's compiled loops
when a batch has too few rows to give each thread its own (and every parallel region ends at one). When
another process keeps a core busy, the operating system deschedules one of those threads now and then,
and the others wait at the barrier, spinning, for the rest of its time slice: with one CPU-bound
process beside it, a 2-thread run on 2 cores took several times longer than a 1-thread run
(docs/running.md, `scripts/bench_contention.py`). More threads than free cores is the collapse.

`auto` therefore uses the cores that are free: the cores this process may run on (its CPU affinity,
and a container's CPU quota, cgroup `cpu.max`), less those that other processes keep busy, measured
from /proc/stat; and during training it measures again every few seconds and follows the load. A
thread count given as a number, or by `OMP_NUM_THREADS`, is used as it is.

A thread count changes how some sums are split between threads, and so the last bits of a result: a
run whose thread count changed continues up to float32 rounding, not bit for bit (a fixed count,
`train.threads: N`, is bit for bit).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

# Seconds between two measurements of the load during training, and measurements in a row that must
# agree before the count changes (so that a short burst of another process does not move it).
INTERVAL = 2.0
AGREEING = 2
# The shortest measurement that `start` takes (sleeping for the rest when the command started just now).
FIRST_WINDOW = 0.25


def allowed_cores() -> tuple[int, str]:
    """The cores this process may use, and why: its CPU affinity, and the CPU quota of its cgroup."""
    try:
        cores, why = len(os.sched_getaffinity(0)), "CPU affinity"
    except (AttributeError, OSError):
        cores, why = os.cpu_count() or 1, "CPU count"
    quota = cgroup_quota()
    if quota is not None and quota < cores:
        cores, why = max(1, math.floor(quota + 1e-6)), f"cgroup CPU quota {quota:g}"
    return cores, why


def cgroup_quota(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup and its parents, in cores (cgroup v2 `cpu.max`, or v1
    `cpu.cfs_quota_us` / `cpu.cfs_period_us`); None when there is none or it cannot be read."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: cpu.max in the group and each parent
            folder = root / path.lstrip("/")
            for group in (folder, *folder.parents):
                if not group.is_relative_to(root):
                    break
                quotas.append(_v2_quota(group / "cpu.max"))
        elif "cpu" in controllers.split(","):
            for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
                folder = root / name / path.lstrip("/")
                if folder.is_dir():
                    quotas.append(_v1_quota(folder))
                    break
    found = [quota for quota in quotas if quota is not None]
    return min(found) if found else None


def _v2_quota(path: Path) -> float | None:
    try:
        limit, period = path.read_text().split()[:2]
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        return None


def _v1_quota(folder: Path) -> float | None:
    try:
        limit = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if limit <= 0 or period <= 0 else limit / period


class Load:
    """The CPU time that other processes use on the cores this one may use, from /proc/stat: all busy
    time there less this process's own (its threads, and its children that ended). Cheap, and free of
    torch, so that a command can start measuring before torch loads."""

    def __init__(self, stat: Path = Path("/proc/stat")) -> None:
        self.stat = stat
        try:
            self.cpus = {f"cpu{index}" for index in os.sched_getaffinity(0)}
        except (AttributeError, OSError):
            self.cpus = None
        self.last = self._read()

    def _read(self) -> tuple[float, float, float] | None:
        """(busy seconds of the allowed cores, this process's CPU seconds, wall seconds)."""
        try:
            lines = self.stat.read_text().splitlines()
        except OSError:
            return None
        ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        busy = 0
        for line in lines:
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu" or (self.cpus is not None and name not in self.cpus):
                continue
            values = [int(value) for value in fields[:8]]  # user nice system idle iowait irq softirq steal
            busy += sum(values) - values[3] - values[4]
        own = os.times()
        return busy / ticks, own.user + own.system + own.children_user + own.children_system, time.monotonic()

    def others(self, *, at_least: float = 0.0) -> float | None:
        """Cores the other processes kept busy since the last call (or since this object was made),
        waiting until `at_least` seconds have passed; None where /proc/stat cannot be read or too little
        time has passed to tell."""
        if self.last is not None and (wait := at_least - (time.monotonic() - self.last[2])) > 0:
            time.sleep(wait)
        now, last = self._read(), self.last
        if now is None or last is None or now[2] - last[2] < 0.05:
            return None
        self.last = now
        return max(0.0, (now[0] - last[0]) - (now[1] - last[1])) / (now[2] - last[2])


class ThreadCount:
    """The thread count of one command: fixed (a number, or `OMP_NUM_THREADS`), or `auto`, which
    follows the free cores when `follow` is called (every INTERVAL seconds at most)."""

    def __init__(self, setting: int | str = "auto", *, load: Load | None = None,
                 environment: dict[str, str] | os._Environ = os.environ) -> None:
        import torch

        self.cores, self.cores_why = allowed_cores()
        self.previous = torch.get_num_threads()
        self.fixed: int | None = None
        if isinstance(setting, int):
            self.fixed, self.why = setting, "train.threads"
        elif environment.get("OMP_NUM_THREADS", "").strip().isdigit() and int(environment["OMP_NUM_THREADS"]) > 0:
            self.fixed, self.why = int(environment["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
        self.load = None if self.fixed is not None else (load or Load())
        self.count, self.candidate, self.agreeing, self.checked = 0, 0, 0, time.monotonic()

    def start(self) -> str:
        """Set the count now; returns what it is and why, e.g. "2 threads (auto: 2 of 2 cores free)"."""
        if self.fixed is not None:
            self.count = self.fixed
            described = f"{_threads(self.count)} ({self.why}"
            described += (f"; more than the {self.cores} cores this process may use: the threads wait on each other)"
                          if self.count > self.cores else ")")
        else:
            others = self.load.others(at_least=FIRST_WINDOW)
            self.count = self._free(others)
            described = f"{_threads(self.count)} (auto: {self._describe(others)})"
        _set_threads(self.count)
        self.checked = time.monotonic()
        return described

    def follow(self) -> str | None:
        """For `auto`: measure again if INTERVAL has passed, and change the count once AGREEING
        measurements in a row ask for the same other count; a line saying so, or None."""
        if self.fixed is not None or time.monotonic() - self.checked < INTERVAL:
            return None
        self.checked = time.monotonic()
        others = self.load.others()
        if others is None:
            return None
        wanted = self._free(others)
        if wanted == self.count:
            self.agreeing = 0
            return None
        self.agreeing = self.agreeing + 1 if wanted == self.candidate else 1
        self.candidate = wanted
        if self.agreeing < AGREEING:
            return None
        line = f"threads: {self.count} -> {wanted} ({self._describe(others)})"
        self.count, self.agreeing = wanted, 0
        _set_threads(wanted)
        return line

    def restore(self) -> None:
        """Give the process back the thread count it had before `start`."""
        _set_threads(self.previous)

    def _free(self, others: float | None) -> int:
        """The cores less those other processes keep busy; a process using more than a quarter of a core
        takes one (even a part-time competitor stalls the barriers of a thread that shares its core)."""
        if others is None:
            return self.cores
        return max(1, self.cores - max(0, math.ceil(others - 0.25)))

    def _describe(self, others: float | None) -> str:
        allowed = f"{self.cores} core{'s' * (self.cores > 1)} ({self.cores_why})"
        return allowed if others is None else f"{allowed}, {others:.1f} kept busy by other processes"


def _set_threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)


def _threads(count: int) -> str:
    return f"{count} thread{'s' * (count > 1)}"


def set_for_command(setting: int | str = "auto", *, load: Load | None = None,
                    report: Callable[[str], None] | None = None) -> ThreadCount:
    """Choose and set the thread count once, for a command that does not run long enough to follow
    the load (sampling, evaluation)."""
    count = ThreadCount(setting, load=load)
    line = count.start()
    if report is not None:
        report(line)
    return count
