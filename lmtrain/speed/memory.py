"""Keep freed memory in the process, so a training step does not hand its large buffers back to the
kernel and fault them in again at the next step.

glibc's malloc serves allocations above its mmap threshold with fresh pages from the kernel and
trims the top of its heap when much is free. A training step allocates and frees the same large
tensors (logits and their gradient, gate buffers) every step, so by default each step pays page
faults for all of them (docs/results.md measures it with scripts/page_faults.py). The settings are the ones
`MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=268435456`
give: buffers up to 32 MiB (glibc's largest mmap threshold) come from the heap, and freed memory
stays in it.

Also how much memory the process may still take (`available_bytes`), which the size checks of a model,
its training and its diagnostics compare against before they allocate.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

try:
    import resource
except ImportError:  # not on Windows
    resource = None

# mallopt parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
# mallopt takes a C int, so the trim threshold is 2 GiB where the variable above says 16 GiB.
SETTINGS = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: (1 << 31) - 1, M_TOP_PAD: 256 << 20}


def keep_freed_memory() -> bool:
    """Apply SETTINGS through glibc's `mallopt`; True if applied. Nothing happens off glibc, or when the
    user set any MALLOC_* variable (theirs win), or when LMTRAIN_KEEP_FREED_MEMORY=0."""
    if os.environ.get("LMTRAIN_KEEP_FREED_MEMORY") == "0" or any(name.startswith("MALLOC_") for name in os.environ):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return all(libc.mallopt(parameter, value) == 1 for parameter, value in SETTINGS.items())
    except (OSError, AttributeError):
        return False


def available_bytes(meminfo: str = "/proc/meminfo", status: str = "/proc/self/status") -> int | None:
    """The memory a process may still take: Linux's MemAvailable, capped by a container's memory limit
    (cgroup memory.max or v1's memory.limit_in_bytes) and by what this process's own limits leave
    (`ulimit -v`, `ulimit -d`); None where none of them can be read."""
    found = []
    try:
        for line in open(meminfo, encoding="ascii"):
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(limit, encoding="ascii").read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            found.append(int(text))
    found.extend(_left_under_process_limits(status))
    return min(found) if found else None


def _left_under_process_limits(status: str) -> list[int]:
    """What RLIMIT_AS and RLIMIT_DATA leave: each soft limit less what the process has mapped (VmSize) or
    holds as data (VmData). A process near its limit fails inside an allocation, where torch reports it
    as a C++ `bad_alloc` or a failed storage, not as a size the checks could have named."""
    if resource is None:
        return []
    try:
        used = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in open(status, encoding="ascii")
                if line.startswith(("VmSize:", "VmData:"))}
    except (OSError, ValueError, IndexError):
        return []
    left = []
    for name, field in (("RLIMIT_AS", "VmSize"), ("RLIMIT_DATA", "VmData")):
        soft = resource.getrlimit(getattr(resource, name))[0]
        if soft != resource.RLIM_INFINITY and field in used:
            left.append(max(soft - used[field], 0))
    return left
